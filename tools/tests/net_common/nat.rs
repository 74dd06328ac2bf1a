//! Helpers for the NAT scenario tests (real `swarm` processes inside `swarm-netlab` namespaces).

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use swarm_model::RunConfig;
use swarm_netlab::Host;

use super::BIN;

/// A small run (2 layers, 2 stages) that trains in milliseconds per step.
pub fn config(steps: u64) -> RunConfig {
    let mut cfg = RunConfig::default();
    cfg.model.hidden_size = 32;
    cfg.model.intermediate_size = 64;
    cfg.model.num_hidden_layers = 2;
    cfg.model.num_attention_heads = 4;
    cfg.model.num_key_value_heads = Some(2);
    cfg.model.max_position_embeddings = 32;
    cfg.stages = vec![0, 1, 2];
    cfg.train.steps = steps;
    cfg.train.micro_batches = 4;
    cfg.train.micro_batch_size = 2;
    cfg.train.seq_len = 16;
    cfg.train.warmup_steps = 1;
    cfg.train.lr = 1e-2;
    cfg.train.checkpoint_every = 100;
    cfg.validate().unwrap();
    cfg
}

/// A child killed on drop, its stdout lines on a channel.
pub struct Proc {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn spawn(host: &Host, args: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut cmd = host.command(BIN);
    cmd.args(args)
        .env(
            "SWARM_LOG",
            std::env::var("NAT_TEST_LOG").unwrap_or("warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn swarm");
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Proc { child, lines }
}

pub fn first_json(p: &Proc, limit: Duration) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = p.lines.recv_timeout(left).expect("a JSON line in time");
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
            && v.is_object()
        {
            return v;
        }
    }
}
