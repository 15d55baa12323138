//! The `snapblk` command.

use clap::Parser;
use snapblk::cli::{Cli, Command};
use tracing_subscriber::EnvFilter;

fn main() {
    let cli = Cli::parse();
    // The daemon logs what it does; one-shot commands only warnings (RUST_LOG overrides).
    let default = match cli.command {
        Command::Serve(_) | Command::Csi(_) => "info",
        _ => "warn",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = snapblk::cli::run(cli) {
        if e.chain()
            .any(|c| c.is::<snapblk::cli::output::StdoutClosed>())
        {
            return;
        }
        eprintln!("snapblk: error: {e:#}");
        std::process::exit(1);
    }
}
