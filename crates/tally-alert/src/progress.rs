//! How far event time has closed, for alert evaluation: the watermark, and
//! when a live stream stops, the watermark carried forward by the wall clock
//! (so a series that stops still closes its buckets and `count < 1` fires).
//! A stream whose event time is far behind the wall clock (a backfill, a
//! replay of old data) is never carried forward: only its own watermark
//! closes its buckets.

use tally_types::Millis;

#[derive(Debug, Clone)]
pub struct Progress {
    watermark: Option<Millis>,
    /// Wall time the watermark last moved.
    moved_at: Millis,
    /// The furthest point reported so far (never goes back).
    closed: Option<Millis>,
    /// Wall time to wait after the watermark stops before carrying it forward.
    pub grace_ms: Millis,
    /// A watermark further than this behind the wall clock is not live.
    pub live_horizon_ms: Millis,
}

impl Progress {
    pub fn new(grace_ms: Millis, live_horizon_ms: Millis) -> Progress {
        Progress {
            watermark: None,
            moved_at: 0,
            closed: None,
            grace_ms,
            live_horizon_ms,
        }
    }

    /// The processor's watermark as of wall time `now`.
    pub fn observe(&mut self, watermark: Option<Millis>, now: Millis) {
        if watermark > self.watermark {
            self.watermark = watermark;
            self.moved_at = now;
        }
    }

    /// Event time up to which buckets are closed at wall time `now`.
    pub fn closed_through(&mut self, now: Millis) -> Option<Millis> {
        let wm = self.watermark?;
        let mut t = wm;
        let live = self.moved_at - wm <= self.live_horizon_ms;
        let idle = now - self.moved_at - self.grace_ms;
        if live && idle > 0 {
            t = wm + idle;
        }
        self.closed = self.closed.max(Some(t));
        self.closed
    }
}
