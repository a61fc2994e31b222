use super::*;

fn policy(min: u32, max: u32) -> Policy {
    Policy {
        min,
        max,
        target_lag: 100,
        target_utilization: 0.8,
        stabilization: Duration::from_secs(30),
    }
}

/// A switcher in a simple world: `arrivals(t)` messages a second come in, each replica finishes
/// `capacity` a second, and replicas follow each decision one interval later.
struct Simulation {
    policy: Policy,
    capacity: f64,
    replicas: u32,
    lag: f64,
    window: Window,
    /// (second, replicas, lag) after each decision.
    trace: Vec<(u64, u32, u64)>,
    changes: Vec<(u64, Decision)>,
}

impl Simulation {
    fn new(policy: Policy, capacity: f64, replicas: u32) -> Simulation {
        Simulation {
            policy,
            capacity,
            replicas,
            lag: 0.0,
            window: Window::default(),
            trace: Vec::new(),
            changes: Vec::new(),
        }
    }

    fn run(&mut self, seconds: std::ops::Range<u64>, arrivals: impl Fn(u64) -> f64) {
        for t in seconds {
            let offered = self.lag + arrivals(t);
            let processed = offered.min(f64::from(self.replicas) * self.capacity);
            self.lag = offered - processed;
            let sample = Sample {
                at: Duration::from_secs(t),
                lag: self.lag.round() as u64,
                busy: processed / self.capacity,
                rate: processed,
            };
            self.window.push(sample, self.policy.stabilization);
            let decision = decide(&self.policy, self.replicas, &self.window.samples(), None);
            assert!(
                (self.policy.min..=self.policy.max).contains(&decision.desired),
                "{decision:?} left the bounds"
            );
            if decision.desired != self.replicas {
                self.changes.push((t, decision.clone()));
            }
            self.replicas = decision.desired;
            self.trace.push((t, self.replicas, self.lag.round() as u64));
        }
    }

    fn replicas_at(&self, t: u64) -> u32 {
        self.trace
            .iter()
            .find(|(s, _, _)| *s == t)
            .map(|(_, r, _)| *r)
            .unwrap()
    }

    fn changes_between(&self, from: u64, to: u64) -> usize {
        self.changes
            .iter()
            .filter(|(t, _)| (from..to).contains(t))
            .count()
    }
}

#[test]
fn a_step_in_load_scales_up_in_proportion_within_two_intervals_and_drains() {
    // 1,000 a second where one replica does 200: five are needed.
    let mut sim = Simulation::new(policy(1, 10), 200.0, 1);
    sim.run(0..10, |_| 100.0);
    assert_eq!(sim.replicas_at(9), 1);
    sim.run(10..120, |_| 1000.0);
    assert!(sim.replicas_at(11) >= 5, "{:?}", &sim.trace[8..14]);
    let drained = sim
        .trace
        .iter()
        .find(|(t, _, lag)| *t > 10 && *lag < 100)
        .map(|(t, _, _)| *t);
    assert!(
        drained.is_some_and(|t| t < 20),
        "the lag did not drain: {:?}",
        &sim.trace[10..30]
    );
    // Once the backlog's window has passed it settles, without flapping, above what the load needs
    // (80 % busy).
    assert!(sim.changes_between(12, 40) == 0, "{:?}", sim.changes);
    assert_eq!(sim.changes_between(50, 120), 0, "{:?}", sim.changes);
    assert!(sim.replicas_at(119) >= 7, "{}", sim.replicas_at(119));
    let (_, first) = &sim.changes[0];
    assert_eq!(first.change, Change::Up);
    assert!(
        first.reason.starts_with("scaled up from 1 to"),
        "{}",
        first.reason
    );
}

#[test]
fn a_spike_scales_up_at_once_and_back_down_only_after_the_window() {
    let mut sim = Simulation::new(policy(1, 8), 200.0, 1);
    sim.run(0..5, |_| 0.0);
    sim.run(5..6, |_| 3000.0);
    sim.run(6..100, |_| 0.0);
    assert_eq!(sim.replicas_at(5), 8, "{:?}", &sim.trace[..8]);
    // Nothing goes down before the 30s window has passed since the spike.
    assert!((6..35).all(|t| sim.replicas_at(t) >= 2), "{:?}", sim.trace);
    assert_eq!(sim.replicas_at(99), 1);
    let downs: Vec<_> = sim
        .changes
        .iter()
        .filter(|(_, d)| d.change == Change::Down)
        .collect();
    assert!(downs.len() <= 2, "{downs:?}");
    assert!(
        downs[0].1.reason.contains("over the last 30s"),
        "{}",
        downs[0].1.reason
    );
}

#[test]
fn steady_load_does_not_oscillate() {
    let mut sim = Simulation::new(policy(1, 10), 200.0, 1);
    sim.run(0..300, |_| 600.0);
    // The start overshoots while the first backlog drains, settles once its window has passed, and
    // then never moves again.
    assert!(sim.changes.len() <= 3, "{:?}", sim.changes);
    assert_eq!(sim.changes_between(40, 300), 0, "{:?}", sim.changes);
    let r = sim.replicas_at(299);
    assert!(
        (4..=5).contains(&r),
        "{r}: 600/s at 200 per replica and 80 % busy needs 4"
    );
}

#[test]
fn a_decaying_load_scales_down_step_by_step_to_the_minimum() {
    let mut sim = Simulation::new(policy(2, 10), 200.0, 2);
    sim.run(0..30, |_| 1500.0);
    let peak = sim.replicas_at(29);
    sim.run(30..150, |t| (1500.0 - (t - 30) as f64 * 15.0).max(0.0));
    sim.run(150..250, |_| 0.0);
    // Never back up while the load only falls.
    let after_peak: Vec<u32> = sim
        .trace
        .iter()
        .filter(|(t, _, _)| *t >= 30)
        .map(|(_, r, _)| *r)
        .collect();
    assert!(
        after_peak.windows(2).all(|w| w[1] <= w[0]),
        "{after_peak:?}"
    );
    assert!(peak >= 8);
    assert_eq!(sim.replicas_at(249), 2);
}

#[test]
fn noisy_oscillating_input_does_not_make_it_flap() {
    let mut sim = Simulation::new(policy(1, 10), 200.0, 1);
    // 200 and 1,800 a second in turns, 1,000 on average.
    sim.run(0..300, |t| if t % 2 == 0 { 200.0 } else { 1800.0 });
    assert!(sim.changes_between(30, 300) <= 1, "{:?}", sim.changes);
    assert!(sim.trace.iter().all(|(_, r, _)| *r <= 10));
    assert!(sim.trace.iter().skip(30).all(|(_, _, lag)| *lag < 2000));
}

#[test]
fn a_full_downstream_unit_holds_the_switcher_and_says_so() {
    let p = policy(1, 10);
    let backlog = [Sample {
        at: Duration::from_secs(1),
        lag: 2000,
        busy: 1.0,
        rate: 200.0,
    }];
    let full = Pressure {
        unit: "closet".into(),
        lag: 9500,
        limit: 10_000,
    };
    let held = decide(&p, 2, &backlog, Some(&full));
    assert_eq!((held.desired, held.change), (2, Change::Hold));
    assert!(
        held.reason
            .contains("downstream unit `closet` is near its limit"),
        "{}",
        held.reason
    );
    let roomy = Pressure { lag: 1000, ..full };
    assert_eq!(decide(&p, 2, &backlog, Some(&roomy)).desired, 10);
}

#[test]
fn min_zero_scales_to_zero_and_wakes_when_messages_arrive() {
    let mut sim = Simulation::new(policy(0, 5), 200.0, 0);
    sim.run(0..10, |_| 0.0);
    assert!(sim.trace.iter().all(|(_, r, _)| *r == 0));
    let idle = decide(&sim.policy, 0, &sim.window.samples(), None);
    assert!(idle.reason.contains("idle at zero"), "{}", idle.reason);
    sim.run(10..11, |_| 50.0);
    assert!(sim.replicas_at(10) >= 1, "woke within the interval");
    assert!(sim.changes[0].1.reason.contains("woke from zero"));
    sim.run(11..30, |_| 50.0);
    sim.run(30..80, |_| 0.0);
    assert_eq!(sim.replicas_at(79), 0);
}

#[test]
fn decisions_never_leave_min_and_max() {
    // A deterministic stream of arbitrary inputs.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..2000 {
        let min = (next() % 4) as u32;
        let max = min + 1 + (next() % 6) as u32;
        let current = (next() % 12) as u32;
        let samples: Vec<Sample> = (0..(next() % 40))
            .map(|i| Sample {
                at: Duration::from_secs(i),
                lag: next() % 100_000,
                busy: (next() % 1000) as f64 / 50.0,
                rate: 0.0,
            })
            .collect();
        let d = decide(&policy(min, max), current, &samples, None);
        assert!(
            (min..=max).contains(&d.desired),
            "{min}..{max} from {current}: {d:?}"
        );
    }
}

#[test]
fn holds_explain_why_without_changing_numbers() {
    let p = policy(1, 3);
    let busy = [Sample {
        at: Duration::from_secs(1),
        lag: 50_000,
        busy: 3.0,
        rate: 600.0,
    }];
    let at_max = decide(&p, 3, &busy, None);
    assert_eq!(at_max.change, Change::Hold);
    assert_eq!(at_max.reason, "at maxReplicas 3: the load needs more");
    let mut more = busy;
    more[0].lag = 70_000;
    assert_eq!(decide(&p, 3, &more, None).reason, at_max.reason);
}

#[test]
fn the_policy_comes_from_the_switcher_with_its_defaults() {
    let p = Policy::of(&Switcher::default());
    assert_eq!((p.min, p.max, p.target_lag), (1, 4, 100));
    assert_eq!(p.target_utilization, 0.8);
    assert_eq!(p.stabilization, Duration::from_secs(30));
    let custom = Switcher {
        scale_down_stabilization: Some("5s".into()),
        target_utilization: 50,
        ..Switcher::default()
    };
    let p = Policy::of(&custom);
    assert_eq!(p.stabilization, Duration::from_secs(5));
    assert_eq!(p.target_utilization, 0.5);
}

#[test]
fn the_window_fills_whatever_the_spacing_of_the_samples() {
    // Reports come about a second apart, rarely exactly: here every 1.2 s, for a 5 s window.
    let p = Policy {
        stabilization: Duration::from_secs(5),
        ..policy(1, 10)
    };
    let mut window = Window::default();
    let mut current = 6;
    let mut downs = 0;
    for i in 0..20u64 {
        let sample = Sample {
            at: Duration::from_millis(i * 1200),
            lag: 0,
            busy: 0.0,
            rate: 0.0,
        };
        window.push(sample, p.stabilization);
        let d = decide(&p, current, &window.samples(), None);
        if d.change == Change::Down {
            downs += 1;
            assert!(
                sample.at >= Duration::from_secs(5),
                "{d:?} at {:?}",
                sample.at
            );
        }
        current = d.desired;
    }
    assert_eq!(current, 1, "an idle switcher goes back to its minimum");
    assert_eq!(downs, 1);
}

#[test]
fn an_idle_switcher_at_min_replicas_does_not_claim_to_wait_for_a_scale_down() {
    let p = policy(1, 4);
    let idle = [Sample {
        at: Duration::from_secs(1),
        lag: 0,
        busy: 0.0,
        rate: 0.0,
    }];
    let decision = decide(&p, 1, &idle, None);
    assert_eq!(decision.change, Change::Hold);
    assert_eq!(decision.reason, "at minReplicas 1: the load needs no more");
}
