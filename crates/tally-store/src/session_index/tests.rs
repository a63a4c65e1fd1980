use std::collections::BTreeMap;

use proptest::prelude::*;
use tally_types::bin::unframe;
use tally_types::codec::{BatchReader, BatchWriter, PropValue};

use super::*;
use crate::SessionCorrection;

const M: Millis = 60_000;
const GAP: Millis = 30 * M;

#[derive(Clone, Debug)]
struct Ev {
    ts: Millis,
    user: Option<&'static str>,
    sid: Option<&'static str>,
    ty: &'static str,
    page: Option<i64>,
}

fn batch(evs: &[Ev]) -> Vec<u8> {
    let mut w = BatchWriter::new();
    for (i, e) in evs.iter().enumerate() {
        let at = w.begin_event("t", &format!("e{i}"), e.ty, e.ts, e.user, e.sid);
        let n = match e.page {
            Some(p) => {
                w.prop("page", PropValue::Int(p));
                1
            }
            None => 0,
        };
        w.finish_event(at, n);
    }
    w.finish()
}

fn feed(ix: &mut SessionIndex, evs: &[Ev]) {
    let b = batch(evs);
    for e in BatchReader::new(&b).unwrap() {
        ix.add(&e.unwrap());
    }
}

/// Sessions the plain way: all events sorted by time (ties in arrival
/// order), explicit ones grouped by id, the others per user split at gaps.
fn oracle(evs: &[Ev], gap: Millis) -> Vec<Session> {
    let mut sorted: Vec<(usize, &Ev)> = evs.iter().enumerate().collect();
    sorted.sort_by_key(|(i, e)| (e.ts, *i));
    let mut groups: BTreeMap<(bool, Option<&str>), Vec<&Ev>> = BTreeMap::new();
    for (_, e) in &sorted {
        match e.sid {
            Some(s) => groups.entry((false, Some(s))).or_default().push(e),
            None => groups.entry((true, e.user)).or_default().push(e),
        }
    }
    let mut out = Vec::new();
    let mk = |evs: &[&Ev], derived: bool, sid: Option<&str>, arrival_user: Option<&str>| {
        let first = evs[0];
        let last = evs[evs.len() - 1];
        Session {
            session_id: match sid {
                Some(s) => s.to_string(),
                None => format!("{}:{}", arrival_user.unwrap_or(""), first.ts),
            },
            derived,
            user_id: arrival_user.map(str::to_string),
            start: first.ts,
            end: last.ts,
            events: evs.len() as u64,
            first_page: first.page.map(|p| p.to_string()),
            last_page: last.page.map(|p| p.to_string()),
            event_types: evs.iter().map(|e| e.ty.to_string()).collect(),
        }
    };
    for ((derived, key), g) in groups {
        if !derived {
            // The user is that of the first event (in arrival order) with one.
            let user = evs
                .iter()
                .find(|e| e.sid == key && e.user.is_some())
                .and_then(|e| e.user);
            out.push(mk(&g, false, key, user));
            continue;
        }
        let mut cur: Vec<&Ev> = Vec::new();
        for e in g {
            if cur.last().is_some_and(|l| e.ts - l.ts >= gap) {
                out.push(mk(&cur, true, None, key));
                cur.clear();
            }
            cur.push(e);
        }
        if !cur.is_empty() {
            out.push(mk(&cur, true, None, key));
        }
    }
    out.sort_by(|a, b| {
        (a.start, &a.user_id, &a.session_id).cmp(&(b.start, &b.user_id, &b.session_id))
    });
    out
}

fn all(ix: &SessionIndex) -> Vec<Session> {
    ix.sessions("t", None, Millis::MIN, Millis::MAX, false, usize::MAX)
}

/// A fresh index with `journal`'s frames applied, as recovery does.
fn replay(journal: &[u8], mut ix: SessionIndex) -> SessionIndex {
    for f in unframe(journal).0 {
        ix.apply_frame(f).unwrap();
    }
    ix.recovered();
    ix.check();
    ix
}

fn index() -> SessionIndex {
    let mut ix = SessionIndex::default();
    ix.enable(GAP, 1_000_000);
    ix
}

fn ev(ts: Millis, user: Option<&'static str>, sid: Option<&'static str>, page: i64) -> Ev {
    Ev {
        ts,
        user,
        sid,
        ty: "page_view",
        page: Some(page),
    }
}

#[test]
fn a_late_event_joins_two_sessions_and_the_second_goes() {
    let mut ix = index();
    ix.set_journaling(true);
    let first = [
        ev(0, Some("u"), None, 1),
        ev(5 * M, Some("u"), None, 2),
        ev(50 * M, Some("u"), None, 3),
        ev(55 * M, Some("u"), None, 4),
    ];
    feed(&mut ix, &first);
    let got = all(&ix);
    assert_eq!(got.len(), 2);
    assert_eq!(got[1].session_id, format!("u:{}", 50 * M));
    let mut journal = Vec::new();
    ix.take_delta(&mut journal);
    // 27m is within the gap of both: one session 0 → 55m.
    feed(&mut ix, &[ev(27 * M, Some("u"), None, 9)]);
    let got = all(&ix);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0].start, got[0].end, got[0].events), (0, 55 * M, 5));
    assert_eq!(got[0].first_page.as_deref(), Some("1"));
    assert_eq!(got[0].last_page.as_deref(), Some("4"));
    assert_eq!(ix.len(), 1);
    // The journal says the second is gone.
    ix.take_delta(&mut journal);
    let back = replay(&journal, index());
    assert_eq!(all(&back), got);
}

#[test]
fn an_earlier_event_moves_a_derived_sessions_id() {
    let mut ix = index();
    ix.set_journaling(true);
    feed(&mut ix, &[ev(10 * M, Some("u"), None, 1)]);
    let mut journal = Vec::new();
    ix.take_delta(&mut journal);
    feed(&mut ix, &[ev(M, Some("u"), None, 0)]);
    let got = all(&ix);
    assert_eq!(got[0].session_id, format!("u:{}", M));
    assert_eq!(got[0].first_page.as_deref(), Some("0"));
    ix.take_delta(&mut journal);
    let back = replay(&journal, index());
    assert_eq!(all(&back), got);
    assert_eq!(back.len(), 1);
}

#[test]
fn the_cap_drops_the_oldest_and_raises_the_floor() {
    let mut ix = SessionIndex::default();
    ix.enable(GAP, 100);
    let evs: Vec<Ev> = (0..150)
        .map(|i| {
            ev(
                i * 10 * M,
                Some("u"),
                Some(SIDS[i as usize % SIDS.len()]),
                0,
            )
        })
        .collect();
    // Distinct ids: one session per event.
    let b = {
        let mut w = BatchWriter::new();
        for (i, e) in evs.iter().enumerate() {
            let at = w.begin_event(
                "t",
                &format!("e{i}"),
                e.ty,
                e.ts,
                e.user,
                Some(&format!("s{i}")),
            );
            w.finish_event(at, 0);
        }
        w.finish()
    };
    for e in BatchReader::new(&b).unwrap() {
        ix.add(&e.unwrap());
    }
    assert!(ix.len() <= 100, "{}", ix.len());
    assert!(ix.evicted() >= 50);
    let floor = ix.floor("t");
    let kept = all(&ix);
    assert!(kept.iter().all(|s| s.start >= floor - 1));
    // A range near the floor is not answered here; one far enough after is.
    assert!(!ix.covers("t", floor, GAP));
    assert!(ix.covers("t", floor + INDEX_REACH_MS, GAP));
    assert!(!ix.covers("t", floor + INDEX_REACH_MS, GAP + 1));
    // Another tenant holds everything.
    assert!(ix.covers("other", Millis::MIN, GAP));
    // Events before the floor are not added.
    let before = ix.len();
    feed(&mut ix, &[ev(floor - 5 * M, Some("v"), None, 0)]);
    assert_eq!(ix.len(), before);
}

const SIDS: [&str; 3] = ["a", "b", "c"];

#[test]
fn overlap_finds_a_session_that_started_before_the_range() {
    let mut ix = index();
    feed(
        &mut ix,
        &[
            ev(0, Some("u"), Some("s"), 0),
            ev(100 * M, Some("u"), Some("s"), 1),
        ],
    );
    assert_eq!(ix.sessions("t", None, 50 * M, 60 * M, false, 10).len(), 0);
    assert_eq!(ix.sessions("t", None, 50 * M, 60 * M, true, 10).len(), 1);
    assert_eq!(
        ix.sessions("t", Some("v"), 50 * M, 60 * M, true, 10).len(),
        0
    );
    assert_eq!(ix.sessions("t", None, 101 * M, 160 * M, true, 10).len(), 0);
}

fn arb_events() -> impl Strategy<Value = Vec<Ev>> {
    const USERS: [Option<&str>; 4] = [Some("u1"), Some("u2"), Some("u3"), None];
    const SESS: [Option<&str>; 5] = [None, None, None, Some("s1"), Some("s2")];
    const TYPES: [&str; 3] = ["page_view", "click", "buy"];
    prop::collection::vec(
        (
            0i64..600,
            0usize..4,
            0usize..5,
            0usize..3,
            prop::option::of(0i64..5),
        ),
        0..80,
    )
    .prop_map(|v| {
        v.into_iter()
            .map(|(t, u, s, ty, page)| Ev {
                // Minutes, so ties and exact gaps happen.
                ts: t * M / 2,
                user: USERS[u],
                sid: SESS[s],
                ty: TYPES[ty],
                page,
            })
            .collect()
    })
}

proptest! {
    /// Any arrival order gives the sessions of sorting and splitting, and
    /// the journal taken at any points rebuilds the same index.
    #[test]
    fn the_index_is_the_sorted_split(evs in arb_events(), cuts in prop::collection::vec(0usize..80, 0..4)) {
        let mut ix = index();
        ix.set_journaling(true);
        let mut journal = Vec::new();
        for (i, e) in evs.iter().enumerate() {
            feed(&mut ix, std::slice::from_ref(e));
            ix.check();
            if cuts.contains(&i) {
                ix.take_delta(&mut journal);
            }
        }
        ix.take_delta(&mut journal);
        let want = oracle(&evs, GAP);
        prop_assert_eq!(&all(&ix), &want);
        prop_assert_eq!(ix.len(), want.len());
        let back = replay(&journal, index());
        prop_assert_eq!(&all(&back), &want);
        // A rewritten journal too.
        let mut whole = Vec::new();
        ix.encode_all(&mut whole);
        let again = replay(&whole, index());
        prop_assert_eq!(&all(&again), &want);
        // The metrics' view agrees.
        let stats: Vec<(Millis, Millis, u64)> = want.iter().map(|s| (s.start, s.end - s.start, s.events)).collect();
        let mut got = ix.stats("t", Millis::MIN, Millis::MAX);
        got.sort();
        let mut stats = stats;
        stats.sort();
        prop_assert_eq!(got, stats);
        // And its sums per bucket.
        let step = 20 * M;
        let mut per: BTreeMap<Millis, (u64, i64, u64)> = BTreeMap::new();
        for w in &want {
            let p = per.entry(w.start - w.start.rem_euclid(step)).or_default();
            p.0 += 1;
            p.1 += w.end - w.start;
            p.2 += u64::from(w.events == 1);
        }
        let per: Vec<(Millis, u64, i64, u64)> = per.into_iter().map(|(b, (n, d, o))| (b, n, d, o)).collect();
        prop_assert_eq!(ix.buckets("t", Millis::MIN, Millis::MAX, step), per);
        // Over ranges cut mid-minute and steps of whole minutes or not
        // (the per-minute sums, the edges walked session by session).
        for (from, to) in [(7 * M + M / 2, 200 * M), (30 * M, 30 * M + M / 2), (61 * M + 1, 300 * M - 1), (0, M)] {
            for step in [M, 20 * M, 3 * M / 2, 7_000] {
                let mut per: BTreeMap<Millis, (u64, i64, u64)> = BTreeMap::new();
                for w in want.iter().filter(|w| w.start >= from && w.start < to) {
                    let p = per.entry(w.start - w.start.rem_euclid(step)).or_default();
                    p.0 += 1;
                    p.1 += w.end - w.start;
                    p.2 += u64::from(w.events == 1);
                }
                let per: Vec<(Millis, u64, i64, u64)> = per.into_iter().map(|(b, (n, d, o))| (b, n, d, o)).collect();
                prop_assert_eq!(ix.buckets("t", from, to, step), per.clone());
                prop_assert_eq!(back.buckets("t", from, to, step), per);
            }
        }
        // One user's sessions, from the per-user maps, over ranges cut
        // anywhere (overlapping or by start): the others filtered out.
        for u in ["u1", "u2", "u3", "nobody"] {
            for (from, to) in [(Millis::MIN, Millis::MAX), (60 * M, 200 * M), (150 * M, 151 * M)] {
                for overlap in [false, true] {
                    let everyone = ix.sessions("t", None, from, to, overlap, usize::MAX);
                    let theirs: Vec<Session> = everyone
                        .into_iter()
                        .filter(|s| s.user_id.as_deref() == Some(u))
                        .collect();
                    prop_assert_eq!(ix.sessions("t", Some(u), from, to, overlap, usize::MAX), theirs.clone());
                    prop_assert_eq!(back.sessions("t", Some(u), from, to, overlap, usize::MAX), theirs.clone());
                    let two: Vec<Session> = theirs.into_iter().take(2).collect();
                    prop_assert_eq!(ix.sessions("t", Some(u), from, to, overlap, 2), two);
                }
            }
        }
    }
}

#[test]
fn corrupt_frames_are_errors_not_panics() {
    let mut ix = index();
    for bytes in [&[][..], &[0], &[9, 0, 0, 0, 0], &[0, 1, 0, 0, 0, b't', 7]] {
        assert!(ix.apply_frame(bytes).is_err());
    }
}

#[test]
fn many_types_many_pages_and_the_cap_keep_the_maps_in_step() {
    let mut ix = SessionIndex::default();
    ix.enable(GAP, 50);
    ix.set_journaling(true);
    let mut w = BatchWriter::new();
    for i in 0..400i64 {
        let ty = format!("type{}", i % 70);
        let user = format!("u{}", i % 13);
        let sid = (i % 3 == 0).then(|| format!("s{}", i % 7));
        let at = w.begin_event(
            "t",
            &format!("e{i}"),
            &ty,
            i * 7 * M,
            Some(&user),
            sid.as_deref(),
        );
        w.prop("page", PropValue::Str(&format!("/p{}", i % 11)));
        w.finish_event(at, 1);
    }
    let b = w.finish();
    let mut journal = Vec::new();
    for (k, e) in BatchReader::new(&b).unwrap().enumerate() {
        ix.add(&e.unwrap());
        ix.check();
        if k % 37 == 0 {
            ix.take_delta(&mut journal);
        }
    }
    ix.take_delta(&mut journal);
    assert!(ix.len() <= 50 && ix.evicted() > 0);
    let got = all(&ix);
    // Type numbers past 63 are kept too.
    assert!(
        got.iter()
            .any(|s| s.event_types.iter().any(|t| t == "type69"))
    );
    let mut small = SessionIndex::default();
    small.enable(GAP, 50);
    let back = replay(&journal, small);
    assert_eq!(all(&back), got);
    assert_eq!(back.floor("t"), ix.floor("t"));
}

fn sorted(mut v: Vec<SessionCorrection>) -> Vec<SessionCorrection> {
    v.sort_by_key(|c| format!("{c:?}"));
    v
}

#[test]
fn late_events_tell_the_closed_sessions_they_change() {
    let mut ix = index();
    let first = [
        ev(0, Some("u1"), None, 1),
        ev(5 * M, Some("u1"), None, 2),
        ev(10 * M, Some("u2"), Some("s9"), 3),
        ev(12 * M, Some("u2"), Some("s9"), 4),
        ev(50 * M, Some("u1"), None, 5),
        ev(55 * M, Some("u1"), None, 6),
    ];
    feed(&mut ix, &first);
    let wm = Some(120 * M);
    let mut told = |e: Ev| {
        let b = batch(&[e]);
        let mut fixes = Vec::new();
        for v in BatchReader::new(&b).unwrap() {
            ix.add_telling(&v.unwrap(), wm, &mut fixes);
        }
        fixes
    };
    let f = told(ev(27 * M, Some("u1"), None, 7));
    assert_eq!(f.len(), 2, "{f:?}");
    assert!(
        matches!(&f[0], SessionCorrection::Changed { old, new } if old.events == 2 && new.events == 5 && new.end == 55 * M)
    );
    assert!(
        matches!(&f[1], SessionCorrection::MergedInto { old, into } if old.start == 50 * M && *into == "u1:0")
    );
    let f = told(ev(20 * M, Some("u2"), Some("s9"), 8));
    assert!(
        matches!(&f[..], [SessionCorrection::Changed { old, new }] if old.events == 2 && new.events == 3)
    );
    // Still open at the watermark (ended less than a gap before it): not told.
    let f = told(ev(119 * M, Some("u3"), None, 9));
    assert!(f.is_empty());
    // Before u1's first event: a new id, the old one merged into it.
    let f = told(ev(-10 * M, Some("u1"), None, 0));
    assert!(
        matches!(&f[..], [SessionCorrection::Appeared(n), SessionCorrection::MergedInto { into, .. }] if n.events == 6 && *into == format!("u1:{}", -10 * M))
    );
    // No watermark: nothing told.
    let b = batch(&[ev(30 * M, Some("u1"), None, 0)]);
    let mut fixes = Vec::new();
    for v in BatchReader::new(&b).unwrap() {
        ix.add_telling(&v.unwrap(), None, &mut fixes);
    }
    assert!(fixes.is_empty());
}

proptest! {
    /// Each event tells exactly what comparing the whole answers before
    /// and after it would, at any watermark.
    #[test]
    fn corrections_are_the_difference_of_the_answers(
        evs in arb_events(),
        wms in prop::collection::vec(0i64..700, 80),
    ) {
        let mut ix = index();
        for (k, e) in evs.iter().enumerate() {
            let wm = wms[k] * M / 2;
            let before = oracle(&evs[..k], GAP);
            let after = oracle(&evs[..=k], GAP);
            let b = batch(std::slice::from_ref(e));
            let mut fixes = Vec::new();
            for v in BatchReader::new(&b).unwrap() {
                ix.add_telling(&v.unwrap(), Some(wm), &mut fixes);
            }
            let want = if e.ts < wm {
                crate::session_changes(&before, &after, wm - GAP)
            } else {
                Vec::new()
            };
            prop_assert_eq!(sorted(fixes), sorted(want), "event {} at watermark {}", k, wm);
        }
    }
}
