//! `GET /api/v1/sessions`: a session is the events with one `session_id`;
//! events without one are sessionised per user with an inactivity gap
//! (30 minutes by default).

use std::collections::HashMap;

use arrow::array::{Array, AsArray};
use arrow::datatypes::TimestampMillisecondType;
use datafusion::prelude::{col, lit};
use datafusion::scalar::ScalarValue;
use futures::StreamExt;
use tally_types::Millis;

use crate::{QueryEngine, QueryError};

/// What to look for.
#[derive(Debug, Clone)]
pub struct SessionsQuery {
    pub tenant: String,
    /// `None`: every user's sessions.
    pub user_id: Option<String>,
    pub start: Millis,
    pub end: Millis,
    pub gap_ms: Millis,
    pub limit: usize,
}

/// One session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    pub session_id: String,
    /// Whether the id was derived (events without a `session_id`).
    pub derived: bool,
    pub user_id: Option<String>,
    pub start: Millis,
    pub end: Millis,
    pub events: u64,
}

impl QueryEngine {
    /// Sessions with events in `[start, end)`, ordered by start time.
    pub async fn sessions(&self, q: &SessionsQuery) -> Result<Vec<SessionRow>, QueryError> {
        let memory_limit = self.cfg.memory_limit;
        let df_err = |e| QueryError::from_df(e, memory_limit);
        let ctx = self.context(&q.tenant)?;
        let ts = |v: Millis| {
            lit(ScalarValue::TimestampMillisecond(
                Some(v),
                Some("UTC".into()),
            ))
        };
        let mut df = ctx
            .table("events")
            .await
            .map_err(df_err)?
            .filter(col("ts").gt_eq(ts(q.start)).and(col("ts").lt(ts(q.end))))
            .map_err(df_err)?;
        if let Some(u) = &q.user_id {
            df = df
                .filter(col("user_id").eq(lit(u.as_str())))
                .map_err(df_err)?;
        }
        let df = df
            .select(vec![col("user_id"), col("session_id"), col("ts")])
            .map_err(df_err)?;
        let run = async {
            let mut stream = df.execute_stream().await.map_err(df_err)?;
            // Explicit sessions by id; anonymous ones by user (sorted later).
            let mut by_id: HashMap<String, SessionRow> = HashMap::new();
            let mut anon: HashMap<Option<String>, Vec<Millis>> = HashMap::new();
            while let Some(b) = stream.next().await {
                let b = b.map_err(df_err)?;
                let users = b.column(0).as_string::<i32>();
                let sids = b.column(1).as_string::<i32>();
                let tss = b.column(2).as_primitive::<TimestampMillisecondType>();
                for i in 0..b.num_rows() {
                    let t = tss.value(i);
                    let user = (!users.is_null(i)).then(|| users.value(i));
                    if sids.is_null(i) || sids.value(i).is_empty() {
                        anon.entry(user.map(str::to_string)).or_default().push(t);
                        continue;
                    }
                    let s = by_id
                        .entry(sids.value(i).to_string())
                        .or_insert_with(|| SessionRow {
                            session_id: sids.value(i).to_string(),
                            derived: false,
                            user_id: user.map(str::to_string),
                            start: t,
                            end: t,
                            events: 0,
                        });
                    s.start = s.start.min(t);
                    s.end = s.end.max(t);
                    s.events += 1;
                    if s.user_id.is_none() {
                        s.user_id = user.map(str::to_string);
                    }
                }
            }
            let mut out: Vec<SessionRow> = by_id.into_values().collect();
            for (user, mut times) in anon {
                times.sort_unstable();
                out.extend(sessionise(user.as_deref(), &times, q.gap_ms));
            }
            out.sort_by(|a, b| {
                (a.start, &a.user_id, &a.session_id).cmp(&(b.start, &b.user_id, &b.session_id))
            });
            out.truncate(q.limit);
            Ok(out)
        };
        tokio::time::timeout(std::time::Duration::from_millis(self.cfg.timeout_ms), run)
            .await
            .map_err(|_| QueryError::Timeout(self.cfg.timeout_ms))?
    }
}

/// Splits one user's sorted event times into sessions at gaps of at least
/// `gap_ms`. Derived ids are `<user>:<start ms>`, stable for the same events.
pub(crate) fn sessionise(user: Option<&str>, times: &[Millis], gap_ms: Millis) -> Vec<SessionRow> {
    let mut out: Vec<SessionRow> = Vec::new();
    for &t in times {
        match out.last_mut() {
            Some(s) if t - s.end < gap_ms => {
                s.end = t;
                s.events += 1;
            }
            _ => out.push(SessionRow {
                session_id: format!("{}:{t}", user.unwrap_or("")),
                derived: true,
                user_id: user.map(str::to_string),
                start: t,
                end: t,
                events: 1,
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_split_sessions() {
        let m = 60_000;
        let s = sessionise(Some("u"), &[0, 10 * m, 39 * m, 69 * m, 70 * m], 30 * m);
        let spans: Vec<(Millis, Millis, u64)> =
            s.iter().map(|s| (s.start, s.end, s.events)).collect();
        // 39m → 69m is exactly the gap: a new session.
        assert_eq!(spans, vec![(0, 39 * m, 3), (69 * m, 70 * m, 2)]);
        assert_eq!(s[0].session_id, "u:0");
        assert!(sessionise(None, &[], 30 * m).is_empty());
    }
}
