//! `snapblk serve` (lands with the ublk layer).

/// Arguments of `snapblk serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The volume's folder.
    pub dir: std::path::PathBuf,
}

/// Serves a volume.
pub fn run(_args: ServeArgs) -> anyhow::Result<()> {
    anyhow::bail!("serving is not available in this build")
}
