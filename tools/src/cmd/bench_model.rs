//! `swarm bench model` (issue #2).

#[derive(clap::Args)]
pub struct BenchModelArgs {
    /// Print the result as one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: BenchModelArgs) -> anyhow::Result<()> {
    anyhow::bail!("`swarm bench model` is not built yet (issue #2)")
}
