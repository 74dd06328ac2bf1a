//! A stage worker's state: the cached export served in chunks (FetchState), Reload, and fetching a
//! verified state ([`fetch_state`], [`load_state`]).

use super::*;

impl StageWorker {
    /// The export served to `FetchState`: the full state, or the weights only (an audit's);
    /// each cached for the current step.
    pub(super) async fn export(&self, weights_only: bool) -> Result<Arc<Export>> {
        let epoch = self.epoch();
        let kind = usize::from(weights_only);
        if let Some(e) = lock(&self.inner.state).exports[kind].clone()
            && e.epoch == epoch
            && Some(e.step) == self.step()
        {
            return Ok(e);
        }
        let shard = self.inner.shard.clone();
        let e = tokio::task::spawn_blocking(move || -> Result<Export> {
            let g = lock(&shard);
            let s = g.as_ref().ok_or_else(|| Error::NoState)?;
            let bytes = if weights_only {
                s.export_weights()?
            } else {
                s.export_state()?
            };
            Ok(Export {
                epoch,
                step: s.step(),
                hash: *blake3::hash(&bytes).as_bytes(),
                digest: s.weights_digest()?,
                bytes: Arc::new(bytes),
            })
        })
        .await??;
        let e = Arc::new(e);
        lock(&self.inner.state).exports[kind] = Some(e.clone());
        Ok(e)
    }

    pub(super) async fn on_fetch_state(
        &self,
        _ctx: RequestCtx,
        body: Vec<u8>,
    ) -> Result<rpc::Reply, RpcError> {
        let f: FetchState = wire::decode_body(&body)?;
        self.check_run(&f.run, f.epoch)?;
        self.check_stage(f.stage)?;
        if self.step() != Some(f.step) {
            return Err(refuse(
                code::BAD_REQUEST,
                "this replica is not at that step",
            ));
        }
        let e = self
            .export(f.weights_only)
            .await
            .map_err(|e| refuse(code::INTERNAL, e.to_string()))?;
        let reply = serve_chunk(&f, &e.bytes, e.hash, e.digest)?;
        self.inner
            .stats
            .state_served
            .fetch_add(reply.data.len() as u64, Ordering::Relaxed);
        rpc::reply(&reply)
    }

    pub(super) async fn on_reload(
        &self,
        _ctx: RequestCtx,
        body: Vec<u8>,
    ) -> Result<rpc::Reply, RpcError> {
        let r: Reload = wire::decode_body(&body)?;
        if r.run != self.inner.opts.run {
            return Err(refuse(code::BAD_REQUEST, "another run"));
        }
        self.check_stage(r.stage)?;
        if let Some(digest) = self.reset_in_place(&r).await {
            return rpc::reply(&Applied {
                run: r.run,
                epoch: r.epoch,
                step: r.step,
                stage: r.stage,
                digest,
                sent: self.inner.stats.sent(),
            });
        }
        let shard = load_state(
            &self.inner.peer,
            &self.inner.opts,
            r.epoch,
            r.step,
            &r.source,
        )
        .await
        .map_err(|e| refuse(code::INTERNAL, format!("reload: {e}")))?;
        let digest = shard
            .weights_digest()
            .map_err(|e| refuse(code::INTERNAL, e.to_string()))?;
        self.install(shard, r.epoch)
            .map_err(|e| refuse(code::INTERNAL, e.to_string()))?;
        rpc::reply(&Applied {
            run: r.run,
            epoch: r.epoch,
            step: r.step,
            stage: r.stage,
            digest,
            sent: self.inner.stats.sent(),
        })
    }

    /// A `Reload` naming this replica as the source of the state it already holds (same epoch,
    /// step and digest) is a reset of the step's work, done in place without a transfer.
    /// Returns the digest when it was.
    pub(super) async fn reset_in_place(&self, r: &Reload) -> Option<[u8; 32]> {
        let StateSource::Fetch { from, digest } = &r.source else {
            return None;
        };
        if !from.iter().any(|e| e.peer == self.inner.me)
            || self.epoch() != r.epoch
            || self.step() != Some(r.step)
        {
            return None;
        }
        let mine = self.digest().await.ok().flatten()?;
        if mine != *digest {
            return None;
        }
        self.reset_step();
        tracing::info!(
            stage = self.inner.opts.stage,
            step = r.step,
            "step work reset"
        );
        Some(mine)
    }
}

/// Downloads the state of `stage` at `step` from `from` (tried in order) and verifies it against
/// the stage's agreed weights `digest` ([`crate::state_transfer::fetch_verified`]).
pub async fn fetch_state(
    peer: &PeerShared,
    opts: &StageOptions,
    epoch: u32,
    step: u64,
    from: &[Endpoint],
    digest: [u8; 32],
) -> Result<Shard> {
    let req = StateRequest {
        run: opts.run,
        epoch,
        stage: opts.stage,
        step,
        chunk_bytes: opts.chunk_bytes,
        weights_only: false,
    };
    Ok(fetch_verified(peer, &opts.config, &req, from, digest)
        .await?
        .shard)
}

/// The shard described by `source`: built from the seed (`Init`, step 0) or fetched and verified.
pub async fn load_state(
    peer: &PeerShared,
    opts: &StageOptions,
    epoch: u32,
    step: u64,
    source: &StateSource,
) -> Result<Shard> {
    match source {
        StateSource::Init => {
            if step != 0 {
                return Err(Error::NotFromSeed(step));
            }
            let cfg = opts.config.clone();
            let stage = opts.stage;
            tokio::task::spawn_blocking(move || init_shard(&cfg, stage)).await?
        }
        StateSource::Fetch { from, digest } => {
            fetch_state(peer, opts, epoch, step, from, *digest).await
        }
    }
}
