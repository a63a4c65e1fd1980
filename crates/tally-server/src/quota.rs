//! Per-tenant ingest quotas: a token bucket of events per tenant.
//!
//! A bucket holds up to `burst` events (default: one second's worth) and
//! refills at `events-per-second`. A request is admitted when every tenant
//! in it has the events it brings in its bucket; a batch larger than the
//! whole bucket is admitted when the bucket is full and leaves it in debt,
//! so large batches are slowed to the quota instead of refused forever.
//! A refused request gets `429` with `Retry-After` (whole seconds until the
//! bucket holds enough) and nothing from it is stored. Time comes from the
//! server's [`Clock`], so tests inject it.

use std::collections::HashMap;

use parking_lot::Mutex;
use tally_types::Clock;

use crate::config::{QuotaSection, QuotasSection};

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: i64,
}

/// The quotas and each tenant's bucket.
#[derive(Debug)]
pub struct Quotas {
    cfg: QuotasSection,
    clock: Clock,
    buckets: Mutex<HashMap<String, Bucket>>,
}

/// A request over its tenant's quota.
#[derive(Debug, Clone, PartialEq)]
pub struct OverQuota {
    pub tenant: String,
    pub limit: u64,
    pub retry_after_s: u32,
}

fn capacity(q: &QuotaSection) -> f64 {
    if q.burst_events > 0 {
        q.burst_events as f64
    } else {
        q.events_per_second as f64
    }
}

impl Quotas {
    pub fn new(cfg: QuotasSection, clock: Clock) -> Quotas {
        Quotas {
            cfg,
            clock,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Whether any tenant has a limit (else [`Quotas::take`] is skipped).
    pub fn enabled(&self) -> bool {
        self.cfg.events_per_second > 0 || self.cfg.tenants.values().any(|q| q.events_per_second > 0)
    }

    /// Takes each tenant's events from its bucket, all or nothing.
    pub fn take(&self, demand: &[(String, usize)]) -> Result<(), OverQuota> {
        let now = self.clock.now_ms();
        let mut buckets = self.buckets.lock();
        let mut granted: Vec<(&str, f64)> = Vec::with_capacity(demand.len());
        for (tenant, n) in demand {
            let q = self.cfg.of(tenant);
            if q.events_per_second == 0 {
                continue;
            }
            let rate = q.events_per_second as f64;
            let cap = capacity(&q);
            let b = buckets.get(tenant.as_str()).copied().unwrap_or(Bucket {
                tokens: cap,
                at_ms: now,
            });
            let tokens = (b.tokens + (now - b.at_ms).max(0) as f64 * rate / 1000.0).min(cap);
            let need = (*n as f64).min(cap);
            if tokens + 1e-9 < need {
                let wait_s = ((need - tokens) / rate).ceil().max(1.0);
                return Err(OverQuota {
                    tenant: tenant.clone(),
                    limit: q.events_per_second,
                    retry_after_s: wait_s.min(u32::MAX as f64) as u32,
                });
            }
            granted.push((tenant, tokens - *n as f64));
        }
        for (tenant, tokens) in granted {
            buckets.insert(tenant.to_string(), Bucket { tokens, at_ms: now });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn quotas(rate: u64, burst: u64, clock: &Clock) -> Quotas {
        let mut tenants = BTreeMap::new();
        tenants.insert(
            "big".to_string(),
            QuotaSection {
                events_per_second: 0,
                burst_events: 0,
            },
        );
        Quotas::new(
            QuotasSection {
                events_per_second: rate,
                burst_events: burst,
                tenants,
            },
            clock.clone(),
        )
    }

    fn d(t: &str, n: usize) -> Vec<(String, usize)> {
        vec![(t.to_string(), n)]
    }

    #[test]
    fn bucket_refills_at_the_rate_and_refuses_beyond_it() {
        let clock = Clock::manual(1_000_000);
        let q = quotas(100, 0, &clock);
        assert!(q.take(&d("a", 100)).is_ok());
        let e = q.take(&d("a", 1)).unwrap_err();
        assert_eq!((e.tenant.as_str(), e.limit, e.retry_after_s), ("a", 100, 1));
        // Another tenant has its own bucket; "big" has no limit at all.
        assert!(q.take(&d("b", 100)).is_ok());
        assert!(q.take(&d("big", 1_000_000)).is_ok());
        clock.advance(500);
        assert!(q.take(&d("a", 50)).is_ok());
        assert!(q.take(&d("a", 1)).is_err());
        clock.advance(10_000);
        // Refill stops at the burst.
        assert!(q.take(&d("a", 100)).is_ok());
        assert!(q.take(&d("a", 1)).is_err());
    }

    #[test]
    fn a_batch_larger_than_the_bucket_goes_when_full_and_leaves_debt() {
        let clock = Clock::manual(0);
        let q = quotas(100, 200, &clock);
        assert!(q.take(&d("a", 1000)).is_ok());
        let e = q.take(&d("a", 1000)).unwrap_err();
        // 800 in debt + a full bucket of 200 needed: 10 s at 100/s.
        assert_eq!(e.retry_after_s, 10);
        clock.advance(10_000);
        assert!(q.take(&d("a", 1000)).is_ok());
    }

    #[test]
    fn all_or_nothing_across_tenants() {
        let clock = Clock::manual(0);
        let q = quotas(10, 0, &clock);
        assert!(q.take(&d("b", 10)).is_ok());
        let both = vec![("a".to_string(), 5), ("b".to_string(), 5)];
        assert_eq!(q.take(&both).unwrap_err().tenant, "b");
        // "a" was not charged for the refused request.
        assert!(q.take(&d("a", 10)).is_ok());
    }
}
