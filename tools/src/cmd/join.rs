//! `swarm join` (issue #4).

#[derive(clap::Args)]
pub struct JoinArgs {
    /// Print the result as one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: JoinArgs) -> anyhow::Result<()> {
    anyhow::bail!("`swarm join` is not built yet (issue #4)")
}
