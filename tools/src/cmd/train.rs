//! `swarm train` (issue #2).

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Print the result as one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: TrainArgs) -> anyhow::Result<()> {
    anyhow::bail!("`swarm train` is not built yet (issue #2)")
}
