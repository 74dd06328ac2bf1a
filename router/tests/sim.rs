//! The simulator: deterministic, efficient at small scale, and honest about crashes.

use swarm_router::sim::{self, NoObserver, Observer, SimConfig};

fn small(churn: f64, seed: u64) -> SimConfig {
    let mut cfg = SimConfig::new(200, 4, churn, seed);
    cfg.duration_s = 400.0;
    cfg.warmup_s = 150.0;
    cfg
}

#[test]
fn same_config_same_report_and_seed_matters() {
    let a = sim::run(&small(50.0, 7), &mut NoObserver).unwrap();
    let b = sim::run(&small(50.0, 7), &mut NoObserver).unwrap();
    assert_eq!(a, b);
    let c = sim::run(&small(50.0, 8), &mut NoObserver).unwrap();
    assert_ne!(a, c);
}

#[test]
fn without_churn_routing_reaches_the_optimum() {
    let r = sim::run(&small(0.0, 1), &mut NoObserver).unwrap();
    assert_eq!((r.crashes, r.joins, r.failovers), (0, 0, 0));
    assert!(r.efficiency > 0.9 && r.efficiency <= 1.0, "{r:?}");
    // The optimum is sum of capacity / stages: ~200 peers x ~0.75 mb/s / 4.
    assert!(
        r.optimal_throughput > 20.0 && r.optimal_throughput < 80.0,
        "{r:?}"
    );
    assert!((r.throughput * r.window_s - r.microbatches as f64).abs() < 1e-6);
}

#[test]
fn crashes_cost_retries_and_are_survived() {
    let calm = sim::run(&small(0.0, 2), &mut NoObserver).unwrap();
    // 400%/h: about 90 crashes in 400 s among 200 peers.
    let r = sim::run(&small(400.0, 2), &mut NoObserver).unwrap();
    assert!(r.crashes > 40 && r.joins > 40, "{r:?}");
    assert!(
        r.failovers > r.crashes,
        "queued and passed-through work is re-run: {r:?}"
    );
    assert!(
        r.efficiency < calm.efficiency,
        "crashes must cost something: {r:?} vs {calm:?}"
    );
    assert!(r.efficiency > 0.6, "{r:?}");
}

#[test]
fn observer_times_every_plan_and_sees_progress() {
    struct Count {
        plans: u64,
        last: f64,
    }
    impl Observer for Count {
        fn time_plan(&mut self, f: &mut dyn FnMut()) {
            self.plans += 1;
            f();
        }
        fn progress(&mut self, sim_s: f64, _end: f64) {
            assert!(sim_s >= self.last);
            self.last = sim_s;
        }
    }
    let mut obs = Count {
        plans: 0,
        last: 0.0,
    };
    let r = sim::run(&small(10.0, 3), &mut obs).unwrap();
    assert_eq!(obs.plans, r.plans);
    assert_eq!(obs.last, 400.0);
}

#[test]
fn bad_configs_are_refused() {
    let bad = [
        SimConfig {
            peers: 0,
            ..small(0.0, 0)
        },
        SimConfig {
            stages: 0,
            ..small(0.0, 0)
        },
        SimConfig {
            churn_per_hour_percent: f64::NAN,
            ..small(0.0, 0)
        },
        SimConfig {
            warmup_s: 500.0,
            ..small(0.0, 0)
        },
        SimConfig {
            in_flight_per_peer: 0.0,
            ..small(0.0, 0)
        },
        SimConfig {
            detect_timeout_s: -1.0,
            ..small(0.0, 0)
        },
    ];
    for cfg in bad {
        assert!(sim::run(&cfg, &mut NoObserver).is_err(), "{cfg:?}");
    }
}
