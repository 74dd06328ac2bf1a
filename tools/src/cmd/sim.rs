//! `swarm sim` (issue #5).

#[derive(clap::Args)]
pub struct SimArgs {
    /// Print the result as one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: SimArgs) -> anyhow::Result<()> {
    anyhow::bail!("`swarm sim` is not built yet (issue #5)")
}
