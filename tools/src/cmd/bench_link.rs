//! `swarm bench link` (issue #4).

#[derive(clap::Args)]
pub struct BenchLinkArgs {
    /// Print the result as one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: BenchLinkArgs) -> anyhow::Result<()> {
    anyhow::bail!("`swarm bench link` is not built yet (issue #4)")
}
