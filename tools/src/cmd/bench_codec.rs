//! `swarm bench codec` (issue #3).

#[derive(clap::Args)]
pub struct BenchCodecArgs {
    /// Print the result as one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: BenchCodecArgs) -> anyhow::Result<()> {
    anyhow::bail!("`swarm bench codec` is not built yet (issue #3)")
}
