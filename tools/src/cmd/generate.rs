//! `swarm generate` (issue #2).

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Print the result as one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: GenerateArgs) -> anyhow::Result<()> {
    anyhow::bail!("`swarm generate` is not built yet (issue #2)")
}
