//! `swarm eval` (issue #2).

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Print the result as one JSON object on the last line of stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: EvalArgs) -> anyhow::Result<()> {
    anyhow::bail!("`swarm eval` is not built yet (issue #2)")
}
