//! `swarm status` (issue #4).

#[derive(clap::Args)]
pub struct StatusArgs {
    /// Print the result as one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: StatusArgs) -> anyhow::Result<()> {
    anyhow::bail!("`swarm status` is not built yet (issue #4)")
}
