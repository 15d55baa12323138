//! The `snapblk` command.

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = snapblk::cli::Cli::parse();
    if let Err(e) = snapblk::cli::run(cli) {
        eprintln!("snapblk: error: {e:#}");
        std::process::exit(1);
    }
}
