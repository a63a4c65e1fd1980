//! A seeded generator of realistic clickstream events: tenants, skewed users,
//! 30-minute sessions, event types with properties, and configurable fractions
//! of disordered, late, duplicate and malformed events.

use std::collections::VecDeque;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tally_types::time::{MINUTE_MS, Millis, format_rfc3339};

/// What kind of line the generator produced (for tests and reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Normal,
    /// Behind the newest event by less than the watermark bound.
    Disordered,
    /// Far enough behind to miss its window's allowed lateness.
    Late,
    /// An exact copy of a recent line.
    Duplicate,
    Malformed,
}

#[derive(Debug, Clone)]
pub struct GenConfig {
    pub seed: u64,
    pub tenants: u32,
    pub users: u32,
    /// Event time of the first event (ms); `None`: follow the wall clock.
    pub start_ms: Option<Millis>,
    /// Events per second of event time (ignored in wall-clock mode).
    pub events_per_sec: f64,
    pub disorder: f64,
    pub late: f64,
    pub duplicate: f64,
    pub malformed: f64,
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig {
            seed: 1,
            tenants: 1,
            users: 1000,
            start_ms: None,
            events_per_sec: 100.0,
            disorder: 0.05,
            late: 0.01,
            duplicate: 0.02,
            malformed: 0.01,
        }
    }
}

const TYPES: &[(&str, u32)] = &[
    ("page_view", 60),
    ("click", 25),
    ("add_to_cart", 8),
    ("purchase", 4),
    ("error", 3),
];
const PAGES: &[&str] = &[
    "/",
    "/pricing",
    "/docs",
    "/blog",
    "/signup",
    "/checkout",
    "/product/42",
    "/search",
];
const COUNTRIES: &[&str] = &["US", "DE", "FR", "IN", "BR", "JP", "GB", "NG"];
const DEVICES: &[&str] = &["desktop", "mobile", "tablet"];

pub struct Generator {
    cfg: GenConfig,
    rng: StdRng,
    t: Millis,
    seq: u64,
    recent: VecDeque<String>,
    clock: Box<dyn Fn() -> Millis + Send>,
}

impl Generator {
    pub fn new(cfg: GenConfig) -> Self {
        let clock: Box<dyn Fn() -> Millis + Send> =
            Box::new(|| tally_types::Clock::system().now_ms());
        let t = cfg.start_ms.unwrap_or_else(&clock);
        Generator {
            rng: StdRng::seed_from_u64(cfg.seed),
            cfg,
            t,
            seq: 0,
            recent: VecDeque::new(),
            clock,
        }
    }

    fn pick<'a>(&mut self, xs: &'a [&'a str]) -> &'a str {
        xs[self.rng.random_range(0..xs.len())]
    }

    /// One line of NDJSON and its kind.
    pub fn next_line(&mut self) -> (String, Kind) {
        match self.cfg.start_ms {
            Some(_) => {
                // Exponential inter-arrival times in event time.
                let u: f64 = self.rng.random_range(1e-9..1.0);
                self.t += ((-u.ln()) * 1000.0 / self.cfg.events_per_sec.max(1e-3)) as Millis;
            }
            None => self.t = (self.clock)(),
        }
        let r: f64 = self.rng.random();
        let c = &self.cfg;
        let (kind, ts) = if r < c.malformed {
            return (self.malformed(), Kind::Malformed);
        } else if r < c.malformed + c.duplicate {
            if self.recent.is_empty() {
                // Nothing to copy yet: an ordinary event (not whatever
                // band comes next, which may be a late one).
                (Kind::Normal, self.t)
            } else {
                let i = self.rng.random_range(0..self.recent.len());
                return (self.recent[i].clone(), Kind::Duplicate);
            }
        } else if r < c.malformed + c.duplicate + c.late {
            (
                Kind::Late,
                self.t - self.rng.random_range(20 * MINUTE_MS..40 * MINUTE_MS),
            )
        } else if r < c.malformed + c.duplicate + c.late + c.disorder {
            (Kind::Disordered, self.t - self.rng.random_range(1..4_000))
        } else {
            (Kind::Normal, self.t)
        };
        let line = self.event(ts);
        if self.recent.len() == 200 {
            self.recent.pop_front();
        }
        self.recent.push_back(line.clone());
        (line, kind)
    }

    fn event(&mut self, ts: Millis) -> String {
        self.seq += 1;
        let tenant = if self.cfg.tenants <= 1 {
            "default".to_string()
        } else {
            format!("tenant{}", self.rng.random_range(0..self.cfg.tenants))
        };
        // Skewed users: a few are very active.
        let u: f64 = self.rng.random();
        let user = (u * u * u * self.cfg.users as f64) as u32;
        let session = format!("s_{user}_{}", ts / (30 * MINUTE_MS));
        let mut w: u32 = self.rng.random_range(0..100);
        let mut ty = TYPES[0].0;
        for (name, weight) in TYPES {
            if w < *weight {
                ty = name;
                break;
            }
            w -= weight;
        }
        let page = self.pick(PAGES);
        let country = self.pick(COUNTRIES);
        let device = self.pick(DEVICES);
        let z: f64 = self.rng.random_range(0.0..1.0);
        let duration =
            (20.0 * (1.0 + 60.0 * z * z * z)).round() as i64 + self.rng.random_range(0..20);
        let mut props = format!(
            r#"{{"page":"{page}","duration_ms":{duration},"country":"{country}","device":"{device}""#
        );
        if ty == "purchase" {
            let cents: u32 = self.rng.random_range(199..50_000);
            props.push_str(&format!(r#","revenue":{}.{:02}"#, cents / 100, cents % 100));
        }
        props.push('}');
        // Mix the two timestamp forms the API accepts.
        let ts_json = if self.seq.is_multiple_of(2) {
            format!("\"{}\"", format_rfc3339(ts))
        } else {
            ts.to_string()
        };
        let sess = if self.seq.is_multiple_of(10) {
            String::new()
        } else {
            format!(r#","session_id":"{session}""#)
        };
        format!(
            r#"{{"event_id":"ev-{}-{}","event_type":"{ty}","timestamp":{ts_json},"tenant":"{tenant}","user_id":"u_{user}"{sess},"properties":{props}}}"#,
            self.cfg.seed, self.seq
        )
    }

    fn malformed(&mut self) -> String {
        self.seq += 1;
        let id = format!("bad-{}-{}", self.cfg.seed, self.seq);
        let ts = self.t;
        match self.rng.random_range(0..6) {
            0 => format!(r#"{{"event_type":"click","timestamp":{ts}}}"#),
            1 => format!(r#"{{"event_id":"{id}","event_type":"click","timestamp":"not a time"}}"#),
            2 => format!(r#"{{"event_id":"{id}","event_type":"has spaces!","timestamp":{ts}}}"#),
            3 => format!(
                r#"{{"event_id":"{id}","event_type":"click","timestamp":{ts},"properties":"oops"}}"#
            ),
            4 => {
                format!(r#"{{"event_id":"{id}","event_type":"click","timestamp":{ts},"user_id":12"#)
            }
            _ => "[1,2,3]".to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With `late: 0.0` nothing is labelled late, the first line of a
    /// stream (nothing to duplicate yet) included: the oracles trust it.
    #[test]
    fn no_late_lines_when_none_are_asked_for() {
        for seed in 0..400 {
            let mut g = Generator::new(GenConfig {
                seed,
                tenants: 2,
                users: 50,
                start_ms: Some(1_793_534_400_000),
                events_per_sec: 20.0,
                disorder: 0.1,
                late: 0.0,
                duplicate: 0.08,
                malformed: 0.03,
            });
            for _ in 0..20 {
                assert_ne!(g.next_line().1, Kind::Late, "seed {seed}");
            }
        }
    }
}
