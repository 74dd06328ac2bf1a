//! The fault-injection flags (`swarm join --fault`, `swarm demo --faulty-peer`): real only in
//! builds with the `fault` feature (on by default, so that the audit demo works from a clean
//! clone; a volunteer build without it, `--no-default-features`, has no fault code at all and
//! refuses the flags with a clear error).

use swarm_core::stage::StageOptions;

#[cfg(feature = "fault")]
pub(crate) use swarm_core::fault::FaultSpec;

/// Without the `fault` feature no fault can be named: parsing one fails.
#[cfg(not(feature = "fault"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultSpec {}

#[cfg(not(feature = "fault"))]
impl std::str::FromStr for FaultSpec {
    type Err = String;
    fn from_str(_: &str) -> Result<Self, String> {
        Err("this swarm was built without fault injection (cargo feature `fault`)".into())
    }
}

#[cfg(not(feature = "fault"))]
impl std::fmt::Display for FaultSpec {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {}
    }
}

/// Stage options with `fault` injected (none without the feature).
pub(crate) fn configure(fault: Option<FaultSpec>) -> impl FnOnce(&mut StageOptions) {
    move |o| {
        #[cfg(feature = "fault")]
        {
            o.fault = fault;
        }
        #[cfg(not(feature = "fault"))]
        {
            let _ = (o, fault);
        }
    }
}
