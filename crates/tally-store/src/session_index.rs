//! Sessions built in the stream. The processor adds every event it keeps
//! (what the raw store keeps: not duplicates, too-late events included) to
//! its tenant's sessions as it applies it, so `GET /api/v1/sessions`, the
//! SQL table `sessions` and the session metrics answer from memory instead
//! of reading the raw events.
//!
//! A session is the events with one `session_id`, or one user's events
//! without one, split where two consecutive events are at least the gap
//! apart. Events may come in any order: an event before a session, or
//! between two sessions of a user, moves a start or joins the two (the
//! later one is replaced by the joined one). The result is what sorting all
//! events and splitting them would give, which the query crate's raw path
//! computes and its tests compare with.
//!
//! # Bounded memory and the floor
//!
//! At most `max_sessions` are held; past it the sessions that started first
//! (of any tenant) are dropped, and their tenant's *floor* rises past their
//! ends. Events before the floor are not added. A range is answered here
//! only when it starts at least [`INDEX_REACH_MS`] after the floor (and the
//! gap asked is the index's): its sessions can then hold no event before
//! the floor, or only one the raw answer would not read either (it reads
//! that far around a range). Anything else reads the raw events. A tenant
//! whose events came before the index existed (an older checkpoint) gets
//! its floor past its newest event.
//!
//! # Persistence
//!
//! With journaling on, every change since the last [`SessionIndex::take_delta`]
//! is remembered (sessions changed, sessions gone, floors raised) and taken
//! at each checkpoint as frames for the sessions journal; recovery applies
//! the frames in order ([`SessionIndex::apply_frame`]) and the log replay
//! adds the events after the checkpoint.

use std::collections::BTreeSet;

use hashbrown::HashMap;
use tally_types::Millis;
use tally_types::bin::{Dec, DecodeError, Enc, frame};
use tally_types::codec::{EventView, PropValue};

use crate::{Session, SessionCorrection};

/// How far before a range the sessions of the raw path read (and so how far
/// after its floor a range must start to be answered from the index).
pub const INDEX_REACH_MS: Millis = 6 * 3_600_000;

/// Sessions held at most by default.
pub const DEFAULT_MAX_SESSIONS: usize = 500_000;

/// Distinct event types one tenant's sessions name; later new ones are
/// listed as `__other__`.
pub const MAX_TYPES: usize = 10_000;

/// Journal frame kinds.
const FRAME_PUT: u8 = 0;
const FRAME_GONE: u8 = 1;
const FRAME_FLOOR: u8 = 2;

/// No page.
const NO_PAGE: u32 = u32::MAX;

const MINUTE: Millis = 60_000;

/// One session as the index holds it (about 80 bytes, plus its id and
/// user; pages and event types are numbered per tenant).
#[derive(Clone, Debug)]
struct Slot {
    /// The explicit `session_id` (empty for a derived session, whose id is
    /// `<user>:<start>`).
    id: Box<str>,
    user: Option<Box<str>>,
    start: Millis,
    end: Millis,
    events: u64,
    first_page: u32,
    last_page: u32,
    /// Event types seen: bit `t` for the tenant's type `t` < 64 (the
    /// others in `Tenant::wide_types`).
    types: u64,
    live: bool,
    derived: bool,
    /// Its key is in the journal (a `gone` is written when it goes; one
    /// made and dropped between two checkpoints needs none).
    journaled: bool,
}

impl Slot {
    fn new(derived: bool, id: &str, user: Option<&str>, ts: Millis) -> Slot {
        Slot {
            id: id.into(),
            user: user.map(Into::into),
            start: ts,
            end: ts,
            events: 0,
            first_page: NO_PAGE,
            last_page: NO_PAGE,
            types: 0,
            live: true,
            derived,
            journaled: false,
        }
    }

    fn key(&self) -> Key {
        if self.derived {
            Key::Derived(self.user.clone(), self.start)
        } else {
            Key::Id(self.id.clone())
        }
    }
}

/// A tenant's pages, numbered and counted by the sessions that name them
/// (a number goes back to the free list when none does).
#[derive(Clone, Debug, Default)]
struct Pages {
    ids: HashMap<Box<str>, u32>,
    names: Vec<Box<str>>,
    refs: Vec<u32>,
    free: Vec<u32>,
}

impl Pages {
    /// The number of `name`, counted once more.
    fn take(&mut self, name: &str) -> u32 {
        if let Some(&i) = self.ids.get(name) {
            self.refs[i as usize] += 1;
            return i;
        }
        let i = match self.free.pop() {
            Some(i) => {
                self.names[i as usize] = name.into();
                self.refs[i as usize] = 1;
                i
            }
            None => {
                self.names.push(name.into());
                self.refs.push(1);
                (self.names.len() - 1) as u32
            }
        };
        self.ids.insert(name.into(), i);
        i
    }

    /// Counts `i` once more.
    fn retain(&mut self, i: u32) {
        if i != NO_PAGE {
            self.refs[i as usize] += 1;
        }
    }

    fn release(&mut self, i: u32) {
        if i == NO_PAGE {
            return;
        }
        let r = &mut self.refs[i as usize];
        *r -= 1;
        if *r == 0 {
            let name = std::mem::take(&mut self.names[i as usize]);
            self.ids.remove(&name);
            self.free.push(i);
        }
    }

    fn name(&self, i: u32) -> Option<&str> {
        (i != NO_PAGE).then(|| &*self.names[i as usize])
    }

    /// Points `slot` at `page` (counting both ends).
    fn set(&mut self, slot: &mut u32, page: Option<&str>) {
        if self.name(*slot) == page {
            return;
        }
        let new = page.map_or(NO_PAGE, |p| self.take(p));
        self.release(*slot);
        *slot = new;
    }
}

/// One event as sessions see it (its type numbered by its tenant).
struct Ev<'a> {
    sid: Option<&'a str>,
    user: Option<&'a str>,
    ts: Millis,
    ty: u32,
    page: Option<&'a str>,
}

/// A user as the derived sessions are looked up by, without allocating:
/// hashes as `Option<Box<str>>` does.
#[derive(Hash)]
struct UserKey<'a>(Option<&'a str>);

impl hashbrown::Equivalent<Option<Box<str>>> for UserKey<'_> {
    fn equivalent(&self, key: &Option<Box<str>>) -> bool {
        self.0 == key.as_deref()
    }
}

/// What names a session in the journal.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Id(Box<str>),
    Derived(Option<Box<str>>, Millis),
}

/// One tenant's sessions.
#[derive(Clone, Debug)]
struct Tenant {
    floor: Millis,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Explicit sessions by id (the id is the slot's: hashed, not copied).
    by_id: hashbrown::HashTable<u32>,
    hasher: hashbrown::DefaultHashBuilder,
    /// Derived sessions per user: (start, slot), by start.
    anon: HashMap<Option<Box<str>>, Vec<(Millis, u32)>>,
    /// Explicit sessions per user (those that name one), in no order: a
    /// user's sessions without walking everyone's.
    by_user: HashMap<Box<str>, Vec<u32>>,
    /// Per minute of start: sessions, summed duration, single-event
    /// sessions (what the session metrics sum, kept as sessions change).
    minutes: std::collections::BTreeMap<Millis, (u64, i64, u64)>,
    by_start: BTreeSet<(Millis, u32)>,
    pages: Pages,
    type_names: Vec<Box<str>>,
    type_ids: HashMap<Box<str>, u32>,
    /// Type numbers past 63 per slot (tenants with that many types).
    wide_types: HashMap<u32, Vec<u32>>,
    /// The longest session ever held (how far before a range one that
    /// overlaps it may start).
    longest: Millis,
    /// Changed since the last delta (journaling on): a bit per slot.
    dirty: Vec<u64>,
    gone: Vec<Key>,
    floor_dirty: bool,
}

impl Tenant {
    fn new(floor: Millis) -> Tenant {
        Tenant {
            floor,
            slots: Vec::new(),
            free: Vec::new(),
            by_id: hashbrown::HashTable::new(),
            hasher: Default::default(),
            anon: HashMap::new(),
            by_user: HashMap::new(),
            minutes: std::collections::BTreeMap::new(),
            by_start: BTreeSet::new(),
            pages: Pages::default(),
            type_names: Vec::new(),
            type_ids: HashMap::new(),
            wide_types: HashMap::new(),
            longest: 0,
            dirty: Vec::new(),
            gone: Vec::new(),
            floor_dirty: false,
        }
    }

    fn type_id(&mut self, name: &str) -> u32 {
        if let Some(&i) = self.type_ids.get(name) {
            return i;
        }
        if self.type_names.len() >= MAX_TYPES && name != crate::dims::OTHER_TYPE {
            // A tenant inventing types without end: the rest are listed
            // as one, so a session's list and this table stay bounded.
            return self.type_id(crate::dims::OTHER_TYPE);
        }
        let i = self.type_names.len() as u32;
        self.type_names.push(name.into());
        self.type_ids.insert(name.into(), i);
        i
    }

    fn add_type(&mut self, i: u32, ty: u32) {
        if ty < 64 {
            self.slots[i as usize].types |= 1 << ty;
        } else {
            let v = self.wide_types.entry(i).or_default();
            if !v.contains(&ty) {
                v.push(ty);
            }
        }
    }

    fn mark(&mut self, i: u32) {
        let w = i as usize / 64;
        if self.dirty.len() <= w {
            self.dirty.resize(w + 1, 0);
        }
        self.dirty[w] |= 1 << (i % 64);
    }

    fn unmark(&mut self, i: u32) {
        if let Some(w) = self.dirty.get_mut(i as usize / 64) {
            *w &= !(1 << (i % 64));
        }
    }

    fn hash_id(&self, id: &str) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(id)
    }

    fn find_id(&self, id: &str) -> Option<u32> {
        let slots = &self.slots;
        self.by_id
            .find(self.hash_id(id), |&i| *slots[i as usize].id == *id)
            .copied()
    }

    fn alloc(&mut self, s: Slot) -> u32 {
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = s;
                i
            }
            None => {
                // Grow by a quarter past 64, not double: the slots are most
                // of the index's memory. Below, double from 4: a tenant
                // with one session holds a few slots, not 64 (a client
                // inventing tenants paid 5 KB for each).
                if self.slots.len() == self.slots.capacity() {
                    let n = self.slots.len();
                    self.slots
                        .reserve_exact(if n < 64 { n.max(4) } else { n / 4 });
                }
                self.slots.push(s);
                (self.slots.len() - 1) as u32
            }
        };
        let s = &self.slots[i as usize];
        self.by_start.insert((s.start, i));
        self.sum(i, 1);
        let s = &self.slots[i as usize];
        if !s.derived {
            let h = self.hash_id(&s.id);
            let (slots, hasher) = (&self.slots, &self.hasher);
            self.by_id.insert_unique(h, i, |&j| {
                use std::hash::BuildHasher;
                hasher.hash_one(&*slots[j as usize].id)
            });
            self.note_user(i);
        } else {
            let start = s.start;
            let (slots, anon) = (&self.slots, &mut self.anon);
            let user = slots[i as usize].user.as_deref();
            match anon.get_mut(&UserKey(user)) {
                Some(v) => {
                    let at = v.partition_point(|&(t, _)| t < start);
                    v.insert(at, (start, i));
                }
                None => {
                    anon.insert(user.map(Into::into), vec![(start, i)]);
                }
            }
        }
        i
    }

    /// What slot `i` adds to the per-minute sums: its minute, duration
    /// and whether it has a single event.
    fn part(&self, i: u32) -> (Millis, i64, u64) {
        let s = &self.slots[i as usize];
        (
            s.start - s.start.rem_euclid(MINUTE),
            s.end - s.start,
            u64::from(s.events == 1),
        )
    }

    /// Adds (`sign` 1) or takes away (-1) slot `i` in its minute's sums.
    fn sum(&mut self, i: u32, sign: i64) {
        let p = self.part(i);
        self.sum_part(p, sign);
    }

    /// Moves slot `i` in the sums from `was` (its part before a change).
    fn resum(&mut self, i: u32, was: (Millis, i64, u64)) {
        let now = self.part(i);
        if now == was {
            return;
        }
        if now.0 == was.0
            && let Some(e) = self.minutes.get_mut(&now.0)
        {
            e.1 += now.1 - was.1;
            e.2 = e.2 + now.2 - was.2;
            return;
        }
        self.sum_part(was, -1);
        self.sum_part(now, 1);
    }

    fn sum_part(&mut self, (m, dur, single): (Millis, i64, u64), sign: i64) {
        let e = self.minutes.entry(m).or_default();
        if sign > 0 {
            e.0 += 1;
            e.1 += dur;
            e.2 += single;
        } else {
            e.0 -= 1;
            e.1 -= dur;
            e.2 -= single;
            if e.0 == 0 {
                self.minutes.remove(&m);
            }
        }
    }

    /// Files explicit slot `i` under its user, if it names one.
    fn note_user(&mut self, i: u32) {
        let Some(u) = self.slots[i as usize].user.as_deref() else {
            return;
        };
        match self.by_user.get_mut(u) {
            Some(v) => v.push(i),
            None => {
                self.by_user.insert(u.into(), vec![i]);
            }
        }
    }

    /// Removes slot `i` from every map (its key noted as gone if the
    /// journal has it).
    fn release(&mut self, i: u32, journaling: bool) {
        self.sum(i, -1);
        let (start, journaled, derived) = {
            let s = &self.slots[i as usize];
            (s.start, s.journaled, s.derived)
        };
        if journaling && journaled {
            let key = self.slots[i as usize].key();
            self.gone.push(key);
        }
        self.by_start.remove(&(start, i));
        if derived {
            let (slots, anon) = (&self.slots, &mut self.anon);
            let user = UserKey(slots[i as usize].user.as_deref());
            if let Some(v) = anon.get_mut(&user) {
                v.retain(|&(_, j)| j != i);
                if v.is_empty() {
                    anon.remove(&user);
                }
            }
        } else {
            let h = self.hash_id(&self.slots[i as usize].id);
            if let Ok(e) = self.by_id.find_entry(h, |&j| j == i) {
                e.remove();
            }
            if let Some(u) = self.slots[i as usize].user.as_deref()
                && let Some(v) = self.by_user.get_mut(u)
            {
                v.retain(|&j| j != i);
                if v.is_empty() {
                    self.by_user.remove(u);
                }
            }
        }
        let s = &mut self.slots[i as usize];
        let (first, last) = (s.first_page, s.last_page);
        // Free the strings now: a released slot waits for reuse.
        *s = Slot::new(false, "", None, 0);
        s.live = false;
        self.pages.release(first);
        self.pages.release(last);
        if !self.wide_types.is_empty() {
            self.wide_types.remove(&i);
        }
        self.free.push(i);
        if journaling {
            self.unmark(i);
        }
    }

    /// Adds an event to slot `i` (first and last page follow the times; on
    /// a tie the first page stays and the last moves, as in time order),
    /// keeping the start order (and, for a derived session whose start
    /// moves, its key) in step.
    fn add_to(&mut self, i: u32, ts: Millis, ty: u32, page: Option<&str>, journaling: bool) {
        let was = self.part(i);
        let s = &mut self.slots[i as usize];
        let old_start = s.start;
        let old_key = (s.derived && ts < old_start && s.journaled).then(|| s.key());
        if s.derived && ts < old_start {
            s.journaled = false;
        }
        let first = s.events == 0;
        if first || ts < s.start {
            s.start = ts;
            self.pages.set(&mut s.first_page, page);
        }
        if first || ts >= s.end {
            s.end = ts;
            self.pages.set(&mut s.last_page, page);
        }
        s.events += 1;
        let (start, dur, derived) = (s.start, s.end - s.start, s.derived);
        self.resum(i, was);
        self.add_type(i, ty);
        self.longest = self.longest.max(dur);
        if start != old_start {
            self.by_start.remove(&(old_start, i));
            self.by_start.insert((start, i));
            if derived {
                let (slots, anon) = (&self.slots, &mut self.anon);
                if let Some(v) = anon.get_mut(&UserKey(slots[i as usize].user.as_deref())) {
                    // It moves earlier, past no other session of the user.
                    if let Some(e) = v.iter_mut().find(|e| e.1 == i) {
                        e.0 = start;
                    }
                }
            }
        }
        if journaling {
            if let Some(k) = old_key {
                self.gone.push(k);
            }
            self.mark(i);
        }
    }

    /// One event; answers the change in the number of sessions. With
    /// `closed_to`, a session that had ended by then (its last event at or
    /// before it) and that the event changes is told to `fixes`: grown,
    /// joined by another (which is merged into it), or new.
    fn add(
        &mut self,
        ev: Ev<'_>,
        gap: Millis,
        journaling: bool,
        closed_to: Option<Millis>,
        fixes: &mut Vec<SessionCorrection>,
    ) -> i64 {
        let Ev {
            sid,
            user,
            ts,
            ty,
            page,
        } = ev;
        let closed = |s: &Slot| closed_to.is_some_and(|c| s.end <= c);
        if let Some(sid) = sid {
            let (i, new) = match self.find_id(sid) {
                Some(i) => (i, 0),
                None => (self.alloc(Slot::new(false, sid, user, ts)), 1),
            };
            let before = (new == 0 && closed(&self.slots[i as usize])).then(|| self.session(i));
            let s = &mut self.slots[i as usize];
            if s.user.is_none()
                && let Some(u) = user
            {
                s.user = Some(u.into());
                self.note_user(i);
            }
            self.add_to(i, ts, ty, page, journaling);
            if let Some(old) = before {
                fixes.push(SessionCorrection::Changed {
                    old,
                    new: self.session(i),
                });
            } else if new == 1 && closed(&self.slots[i as usize]) {
                fixes.push(SessionCorrection::Appeared(self.session(i)));
            }
            return new;
        }
        let (prev, next) = match self.anon.get(&UserKey(user)) {
            Some(v) => {
                let at = v.partition_point(|&(t, _)| t <= ts);
                (
                    at.checked_sub(1).map(|k| v[k].1),
                    v.get(at).map(|&(_, i)| i),
                )
            }
            None => (None, None),
        };
        let joins_prev = prev.filter(|&p| ts - self.slots[p as usize].end < gap);
        let joins_next = next.filter(|&n| self.slots[n as usize].start - ts < gap);
        // What a closed session looked like before the event.
        let told = |me: &Tenant, i: u32| closed(&me.slots[i as usize]).then(|| me.session(i));
        match (joins_prev, joins_next) {
            (Some(p), Some(n)) => {
                // Either closed: both sides are told.
                let tell = closed(&self.slots[p as usize]) || closed(&self.slots[n as usize]);
                let (before_p, before_n) = if tell {
                    (Some(self.session(p)), Some(self.session(n)))
                } else {
                    (None, None)
                };
                self.add_to(p, ts, ty, page, journaling);
                // The later session joins the earlier one: it ends it.
                let (end, last_page, events, types) = {
                    let l = &self.slots[n as usize];
                    (l.end, l.last_page, l.events, l.types)
                };
                let wide = self.wide_types.get(&n).cloned();
                self.pages.retain(last_page);
                self.release(n, journaling);
                let was = self.part(p);
                let s = &mut self.slots[p as usize];
                s.end = s.end.max(end);
                let old_last = std::mem::replace(&mut s.last_page, last_page);
                s.events += events;
                s.types |= types;
                let dur = s.end - s.start;
                self.resum(p, was);
                self.pages.release(old_last);
                for t in wide.into_iter().flatten() {
                    self.add_type(p, t);
                }
                self.longest = self.longest.max(dur);
                if journaling {
                    self.mark(p);
                }
                if let (Some(old_p), Some(old_n)) = (before_p, before_n) {
                    let new = self.session(p);
                    let into = new.session_id.clone();
                    fixes.push(SessionCorrection::Changed { old: old_p, new });
                    fixes.push(SessionCorrection::MergedInto { old: old_n, into });
                }
                -1
            }
            (Some(i), None) => {
                let before = told(self, i);
                self.add_to(i, ts, ty, page, journaling);
                if let Some(old) = before {
                    fixes.push(SessionCorrection::Changed {
                        old,
                        new: self.session(i),
                    });
                }
                0
            }
            (None, Some(i)) => {
                // Earlier than the session: its start, and so its id, moves.
                let before = told(self, i);
                self.add_to(i, ts, ty, page, journaling);
                if let Some(old) = before {
                    let new = self.session(i);
                    let into = new.session_id.clone();
                    fixes.push(SessionCorrection::Appeared(new));
                    fixes.push(SessionCorrection::MergedInto { old, into });
                }
                0
            }
            (None, None) => {
                let i = self.alloc(Slot::new(true, "", user, ts));
                self.add_to(i, ts, ty, page, journaling);
                if closed(&self.slots[i as usize]) {
                    fixes.push(SessionCorrection::Appeared(self.session(i)));
                }
                1
            }
        }
    }

    fn session(&self, i: u32) -> Session {
        let s = &self.slots[i as usize];
        let mut event_types: BTreeSet<String> = (0..64)
            .filter(|t| s.types & (1 << t) != 0)
            .map(|t| self.type_names[t as usize].to_string())
            .collect();
        if let Some(v) = self.wide_types.get(&i) {
            event_types.extend(v.iter().map(|&t| self.type_names[t as usize].to_string()));
        }
        Session {
            session_id: if s.derived {
                format!("{}:{}", s.user.as_deref().unwrap_or(""), s.start)
            } else {
                s.id.to_string()
            },
            derived: s.derived,
            user_id: s.user.as_deref().map(str::to_string),
            start: s.start,
            end: s.end,
            events: s.events,
            first_page: self.pages.name(s.first_page).map(str::to_string),
            last_page: self.pages.name(s.last_page).map(str::to_string),
            event_types,
        }
    }

    /// Puts a whole session (recovery): replaces the one of the same key.
    fn put(&mut self, s: &Session) {
        let key = if s.derived {
            Key::Derived(s.user_id.as_deref().map(Into::into), s.start)
        } else {
            Key::Id(s.session_id.as_str().into())
        };
        self.remove_key(&key);
        let id = if s.derived { "" } else { &s.session_id };
        let mut slot = Slot::new(s.derived, id, s.user_id.as_deref(), s.start);
        slot.end = s.end;
        slot.events = s.events;
        slot.journaled = true;
        slot.first_page = s
            .first_page
            .as_deref()
            .map_or(NO_PAGE, |p| self.pages.take(p));
        slot.last_page = s
            .last_page
            .as_deref()
            .map_or(NO_PAGE, |p| self.pages.take(p));
        self.longest = self.longest.max(s.end - s.start);
        let i = self.alloc(slot);
        for t in &s.event_types {
            let ty = self.type_id(t);
            self.add_type(i, ty);
        }
    }

    fn remove_key(&mut self, key: &Key) -> bool {
        let i = match key {
            Key::Id(id) => self.find_id(id),
            Key::Derived(user, start) => self
                .anon
                .get(&UserKey(user.as_deref()))
                .and_then(|v| v.iter().find(|e| e.0 == *start).map(|e| e.1)),
        };
        match i {
            Some(i) => {
                self.release(i, false);
                true
            }
            None => false,
        }
    }

    fn live(&self) -> usize {
        self.by_start.len()
    }

    /// Slot `i` as a journal frame (the tenant, then the layout of
    /// [`Session::encode`]), written from the slot without building its
    /// [`Session`].
    fn encode_slot(&self, e: &mut Enc, tenant: &str, i: u32) {
        let s = &self.slots[i as usize];
        e.u8(FRAME_PUT);
        e.str(tenant);
        e.u8(u8::from(s.derived));
        e.str(&s.id);
        encode_opt(e, s.user.as_deref());
        e.i64(s.start);
        e.i64(s.end);
        e.u64(s.events);
        encode_opt(e, self.pages.name(s.first_page));
        encode_opt(e, self.pages.name(s.last_page));
        let wide = self.wide_types.get(&i).map_or(&[][..], Vec::as_slice);
        e.u32(s.types.count_ones() + wide.len() as u32);
        let mut bits = s.types;
        while bits != 0 {
            let t = bits.trailing_zeros();
            e.str(&self.type_names[t as usize]);
            bits &= bits - 1;
        }
        for &t in wide {
            e.str(&self.type_names[t as usize]);
        }
    }

    /// The slots changed since the last delta, in order; forgets them.
    fn take_dirty(&mut self) -> Vec<u32> {
        let mut out = Vec::new();
        for (w, bits) in self.dirty.iter().enumerate() {
            let mut b = *bits;
            while b != 0 {
                let k = b.trailing_zeros();
                out.push((w * 64) as u32 + k);
                b &= b - 1;
            }
        }
        self.dirty.clear();
        out
    }
}

/// Every tenant's sessions (see the module documentation).
#[derive(Clone, Debug)]
pub struct SessionIndex {
    on: bool,
    gap_ms: Millis,
    max_sessions: usize,
    journaling: bool,
    tenants: HashMap<Box<str>, Tenant>,
    len: usize,
    /// Sessions dropped for the cap, ever.
    evicted: u64,
    /// Frames taken for a checkpoint that failed, given back to go first
    /// in the next delta.
    pending: Vec<u8>,
    /// A rewrite failed: the next checkpoint must write everything again.
    rewrite: bool,
}

impl Default for SessionIndex {
    fn default() -> Self {
        SessionIndex {
            on: false,
            gap_ms: crate::DEFAULT_SESSION_GAP_MS,
            max_sessions: DEFAULT_MAX_SESSIONS,
            journaling: false,
            tenants: HashMap::new(),
            len: 0,
            evicted: 0,
            pending: Vec::new(),
            rewrite: false,
        }
    }
}

/// The `page` property of an event as `json_get_str(properties, 'page')`
/// reads it (numbers and booleans as text, nested values as JSON).
fn page_of<'a>(e: &EventView<'a>, buf: &'a mut String) -> Option<&'a str> {
    let (_, v) = e.props().find(|(k, _)| *k == "page")?;
    match v {
        PropValue::Null => None,
        PropValue::Str(s) | PropValue::Json(s) => Some(s),
        PropValue::Bool(b) => Some(if b { "true" } else { "false" }),
        PropValue::Int(i) => {
            *buf = i.to_string();
            Some(buf.as_str())
        }
        PropValue::Float(f) => {
            *buf = f.to_string();
            Some(buf.as_str())
        }
    }
}

impl SessionIndex {
    /// Builds sessions from now on, split by `gap_ms`, holding at most
    /// `max_sessions`.
    pub fn enable(&mut self, gap_ms: Millis, max_sessions: usize) {
        self.on = true;
        self.gap_ms = gap_ms.max(1);
        self.max_sessions = max_sessions.max(1);
    }

    pub fn is_on(&self) -> bool {
        self.on
    }

    pub fn gap_ms(&self) -> Millis {
        self.gap_ms
    }

    /// Remembers changes for [`SessionIndex::take_delta`].
    pub fn set_journaling(&mut self, on: bool) {
        self.journaling = on;
        if !on {
            self.pending = Vec::new();
            for t in self.tenants.values_mut() {
                t.dirty = Vec::new();
                t.gone = Vec::new();
            }
        }
    }

    /// Gives back frames a failed checkpoint took: a delta goes ahead of
    /// the next one; after a failed rewrite the next checkpoint rewrites.
    pub fn give_back(&mut self, frames: Vec<u8>, rewrite: bool) {
        if rewrite {
            self.rewrite = true;
            self.pending = Vec::new();
        } else {
            let mut v = frames;
            v.append(&mut self.pending);
            self.pending = v;
        }
    }

    /// Whether the next checkpoint must write every session (see
    /// [`SessionIndex::give_back`]).
    pub fn needs_rewrite(&self) -> bool {
        self.rewrite
    }

    /// Sessions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sessions dropped for the cap, ever (this process).
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// A tenant's floor (`Millis::MIN`: it holds every event).
    pub fn floor(&self, tenant: &str) -> Millis {
        self.tenants.get(tenant).map_or(Millis::MIN, |t| t.floor)
    }

    /// Raises a tenant's floor (recovery from a checkpoint older than the
    /// index: its events so far are not here).
    pub fn raise_floor(&mut self, tenant: &str, floor: Millis) {
        if !self.on {
            return;
        }
        let t = self
            .tenants
            .entry_ref(tenant)
            .or_insert_with(|| Tenant::new(Millis::MIN));
        if floor > t.floor {
            t.floor = floor;
            t.floor_dirty = true;
        }
    }

    /// Adds one kept event.
    pub fn add(&mut self, e: &EventView<'_>) {
        self.add_telling(e, None, &mut Vec::new());
    }

    /// [`SessionIndex::add`], telling `fixes` how the event changed
    /// sessions that had closed by its tenant's watermark `watermark`
    /// (their last event a gap or more before it).
    pub fn add_telling(
        &mut self,
        e: &EventView<'_>,
        watermark: Option<Millis>,
        fixes: &mut Vec<SessionCorrection>,
    ) {
        if !self.on {
            return;
        }
        let t = self
            .tenants
            .entry_ref(e.tenant)
            .or_insert_with(|| Tenant::new(Millis::MIN));
        if e.ts < t.floor {
            return;
        }
        let mut buf = String::new();
        let page = page_of(e, &mut buf);
        let ty = t.type_id(e.event_type);
        let sid = e.session_id.filter(|s| !s.is_empty());
        let ev = Ev {
            sid,
            user: e.user_id,
            ts: e.ts,
            ty,
            page,
        };
        // An event at or past the watermark reaches no closed session.
        let closed_to = watermark
            .filter(|&w| e.ts < w)
            .map(|w| w.saturating_sub(self.gap_ms));
        let d = t.add(ev, self.gap_ms, self.journaling, closed_to, fixes);
        self.len = (self.len as i64 + d) as usize;
        if self.len > self.max_sessions {
            self.evict();
        }
    }

    /// Drops the sessions that started first until 1% under the cap.
    fn evict(&mut self) {
        let target = self.max_sessions - self.max_sessions / 100;
        while self.len > target {
            let Some((name, _)) = self
                .tenants
                .iter()
                .filter_map(|(n, t)| t.by_start.first().map(|&(s, _)| (n, s)))
                .min_by_key(|&(_, s)| s)
            else {
                break;
            };
            let name = name.clone();
            let t = self.tenants.get_mut(&name).expect("found above");
            let &(_, i) = t.by_start.first().expect("found above");
            let end = t.slots[i as usize].end;
            t.release(i, self.journaling);
            if end + 1 > t.floor {
                t.floor = end + 1;
                t.floor_dirty = true;
            }
            self.len -= 1;
            self.evicted += 1;
        }
    }

    /// Whether a range of a tenant starting at `from` (`Millis::MIN`:
    /// unbounded) is answered from here for sessions split by `gap_ms`.
    pub fn covers(&self, tenant: &str, from: Millis, gap_ms: Millis) -> bool {
        if !self.on || gap_ms != self.gap_ms {
            return false;
        }
        let floor = self.floor(tenant);
        floor == Millis::MIN || from >= floor.saturating_add(INDEX_REACH_MS.max(self.gap_ms))
    }

    /// The sessions of a tenant (of one user if given) that start in
    /// `[from, to)`, or with `overlap`, that have an event in it; by start,
    /// user and id, at most `limit`.
    pub fn sessions(
        &self,
        tenant: &str,
        user: Option<&str>,
        from: Millis,
        to: Millis,
        overlap: bool,
        limit: usize,
    ) -> Vec<Session> {
        let Some(t) = self.tenants.get(tenant) else {
            return Vec::new();
        };
        let lo = if overlap {
            from.saturating_sub(t.longest)
        } else {
            from
        };
        if lo >= to {
            return Vec::new();
        }
        let mut out: Vec<Session> = Vec::new();
        let mut take = |i: u32| {
            let s = &t.slots[i as usize];
            if s.start >= lo && s.start < to && (s.start >= from || s.end >= from) {
                out.push(t.session(i));
            }
        };
        match user {
            // One user: their derived sessions (by start) and explicit ones.
            Some(u) => {
                for &(_, i) in t.anon.get(&UserKey(Some(u))).into_iter().flatten() {
                    take(i);
                }
                for &i in t.by_user.get(u).into_iter().flatten() {
                    take(i);
                }
            }
            None => {
                for &(_, i) in t.by_start.range((lo, 0)..(to, 0)) {
                    take(i);
                }
            }
        }
        out.sort_by(|a, b| {
            (a.start, &a.user_id, &a.session_id).cmp(&(b.start, &b.user_id, &b.session_id))
        });
        out.truncate(limit);
        out
    }

    /// `(start, duration, events)` of each session of a tenant starting in
    /// `[from, to)`: what the session metrics need, without copying names.
    pub fn stats(&self, tenant: &str, from: Millis, to: Millis) -> Vec<(Millis, Millis, u64)> {
        let Some(t) = self.tenants.get(tenant) else {
            return Vec::new();
        };
        if from >= to {
            return Vec::new();
        }
        t.by_start
            .range((from, 0)..(to, 0))
            .map(|&(start, i)| {
                let s = &t.slots[i as usize];
                (start, s.end - s.start, s.events)
            })
            .collect()
    }

    /// Per bucket of `step` (from `Millis` 0) of the sessions of a tenant
    /// starting in `[from, to)`: (bucket, sessions, summed duration,
    /// single-event sessions), by bucket. What the session metrics read,
    /// summed in place.
    pub fn buckets(
        &self,
        tenant: &str,
        from: Millis,
        to: Millis,
        step: Millis,
    ) -> Vec<(Millis, u64, i64, u64)> {
        let mut out: Vec<(Millis, u64, i64, u64)> = Vec::new();
        let Some(t) = self.tenants.get(tenant) else {
            return out;
        };
        if from >= to || step <= 0 {
            return out;
        }
        let mut add = |start: Millis, n: u64, dur: i64, single: u64| {
            let b = start - start.rem_euclid(step);
            match out.last_mut() {
                Some(last) if last.0 == b => {}
                _ => out.push((b, 0, 0, 0)),
            }
            let last = out.last_mut().expect("pushed above");
            last.1 += n;
            last.2 += dur;
            last.3 += single;
        };
        let walk = |from: Millis, to: Millis, add: &mut dyn FnMut(Millis, u64, i64, u64)| {
            for &(start, i) in t.by_start.range((from, 0)..(to, 0)) {
                let s = &t.slots[i as usize];
                add(start, 1, s.end - s.start, u64::from(s.events == 1));
            }
        };
        // Whole minutes from the per-minute sums (a step of whole minutes
        // puts each minute in one bucket), the partial ones at the edges
        // session by session.
        let lo = from.saturating_add((MINUTE - from.rem_euclid(MINUTE)) % MINUTE);
        let hi = to - to.rem_euclid(MINUTE);
        if step % MINUTE != 0 || lo >= hi {
            walk(from, to, &mut add);
            return out;
        }
        walk(from, lo, &mut add);
        for (&m, &(n, dur, single)) in t.minutes.range(lo..hi) {
            add(m, n, dur, single);
        }
        walk(hi, to, &mut add);
        out
    }

    /// Appends the changes since the last call as journal frames to `out`
    /// (floors, then sessions gone, then sessions as they are now); returns
    /// how many frames.
    pub fn take_delta(&mut self, out: &mut Vec<u8>) -> usize {
        let mut n = tally_types::bin::unframe(&self.pending).0.len();
        out.append(&mut self.pending);
        let mut e = Enc::new();
        for (name, t) in &mut self.tenants {
            if t.floor_dirty {
                e.buf.clear();
                encode_floor(&mut e, name, t.floor);
                frame(out, &e.buf);
                n += 1;
                t.floor_dirty = false;
            }
            for k in t.gone.drain(..) {
                e.buf.clear();
                e.u8(FRAME_GONE);
                e.str(name);
                encode_key(&mut e, &k);
                frame(out, &e.buf);
                n += 1;
            }
            for i in t.take_dirty() {
                if !t.slots[i as usize].live {
                    continue;
                }
                t.slots[i as usize].journaled = true;
                e.buf.clear();
                t.encode_slot(&mut e, name, i);
                frame(out, &e.buf);
                n += 1;
            }
        }
        n
    }

    /// Every floor and session as journal frames (a rewritten journal);
    /// forgets the pending changes, which these include.
    pub fn encode_all(&mut self, out: &mut Vec<u8>) -> usize {
        let mut n = 0;
        self.pending = Vec::new();
        self.rewrite = false;
        let mut e = Enc::new();
        for (name, t) in &mut self.tenants {
            e.buf.clear();
            encode_floor(&mut e, name, t.floor);
            frame(out, &e.buf);
            n += 1;
            t.floor_dirty = false;
            t.gone.clear();
            t.dirty.clear();
            for &(_, i) in &t.by_start {
                t.slots[i as usize].journaled = true;
                e.buf.clear();
                t.encode_slot(&mut e, name, i);
                frame(out, &e.buf);
                n += 1;
            }
        }
        n
    }

    /// Applies one journal frame (recovery, in journal order); call
    /// [`SessionIndex::recovered`] after the last.
    pub fn apply_frame(&mut self, payload: &[u8]) -> Result<(), DecodeError> {
        let mut d = Dec::new(payload);
        let kind = d.u8()?;
        let tenant = d.str()?;
        let t = self
            .tenants
            .entry_ref(tenant)
            .or_insert_with(|| Tenant::new(Millis::MIN));
        match kind {
            FRAME_FLOOR => {
                t.floor = d.i64()?;
            }
            FRAME_GONE => {
                let key = decode_key(&mut d)?;
                t.remove_key(&key);
            }
            FRAME_PUT => {
                let s = Session::decode(&mut d)?;
                t.put(&s);
            }
            _ => return d.err("unknown sessions journal frame"),
        }
        Ok(())
    }

    /// Recounts after recovery (frames may hold more than the cap when it
    /// was lowered).
    pub fn recovered(&mut self) {
        self.len = self.tenants.values().map(Tenant::live).sum();
        if self.len > self.max_sessions {
            self.evict();
        }
    }

    /// Checks the maps against the slots (tests).
    #[cfg(test)]
    pub(crate) fn check(&self) {
        let mut total = 0;
        for t in self.tenants.values() {
            let live: Vec<u32> = (0..t.slots.len() as u32)
                .filter(|&i| t.slots[i as usize].live)
                .collect();
            total += live.len();
            assert_eq!(t.by_start.len(), live.len());
            assert_eq!(live.len() + t.free.len(), t.slots.len());
            let explicit = live.iter().filter(|&&i| !t.slots[i as usize].derived);
            assert_eq!(t.by_id.len(), explicit.clone().count());
            for &i in explicit {
                assert_eq!(t.find_id(&t.slots[i as usize].id), Some(i));
            }
            let anon: usize = t.anon.values().map(Vec::len).sum();
            assert_eq!(anon + t.by_id.len(), live.len());
            let mut minutes = std::collections::BTreeMap::<Millis, (u64, i64, u64)>::new();
            for &i in &live {
                let s = &t.slots[i as usize];
                let e = minutes
                    .entry(s.start - s.start.rem_euclid(MINUTE))
                    .or_default();
                e.0 += 1;
                e.1 += s.end - s.start;
                e.2 += u64::from(s.events == 1);
            }
            assert_eq!(minutes, t.minutes, "per-minute sums");
            let named: Vec<u32> = live
                .iter()
                .copied()
                .filter(|&i| !t.slots[i as usize].derived && t.slots[i as usize].user.is_some())
                .collect();
            assert_eq!(t.by_user.values().map(Vec::len).sum::<usize>(), named.len());
            for i in named {
                let u = t.slots[i as usize].user.as_deref().unwrap();
                assert!(t.by_user[u].contains(&i), "explicit session by user");
            }
            for (u, v) in &t.anon {
                assert!(v.windows(2).all(|w| w[0].0 < w[1].0), "by start");
                for &(start, i) in v {
                    let s = &t.slots[i as usize];
                    assert!(s.live && s.derived && s.start == start && s.user == *u);
                }
            }
            let mut refs = vec![0u32; t.pages.names.len()];
            for &i in &live {
                for p in [
                    t.slots[i as usize].first_page,
                    t.slots[i as usize].last_page,
                ] {
                    if p != NO_PAGE {
                        refs[p as usize] += 1;
                    }
                }
            }
            assert_eq!(refs, t.pages.refs, "page counts");
            assert_eq!(t.pages.ids.len(), refs.iter().filter(|&&r| r > 0).count());
        }
        assert_eq!(total, self.len);
    }

    /// Forgets everything (a state rebuilt from the log).
    pub fn clear(&mut self) {
        self.tenants.clear();
        self.len = 0;
    }
}

fn encode_floor(e: &mut Enc, tenant: &str, floor: Millis) {
    e.u8(FRAME_FLOOR);
    e.str(tenant);
    e.i64(floor);
}

fn encode_opt(e: &mut Enc, s: Option<&str>) {
    match s {
        None => e.u8(0),
        Some(s) => {
            e.u8(1);
            e.str(s);
        }
    }
}

fn decode_opt<'a>(d: &mut Dec<'a>) -> Result<Option<&'a str>, DecodeError> {
    Ok(match d.u8()? {
        0 => None,
        1 => Some(d.str()?),
        _ => return d.err("bad option tag"),
    })
}

fn encode_key(e: &mut Enc, k: &Key) {
    match k {
        Key::Id(id) => {
            e.u8(0);
            e.str(id);
        }
        Key::Derived(user, start) => {
            e.u8(1);
            encode_opt(e, user.as_deref());
            e.i64(*start);
        }
    }
}

fn decode_key(d: &mut Dec<'_>) -> Result<Key, DecodeError> {
    Ok(match d.u8()? {
        0 => Key::Id(d.str()?.into()),
        1 => {
            let user = decode_opt(d)?.map(Into::into);
            Key::Derived(user, d.i64()?)
        }
        _ => return d.err("bad session key tag"),
    })
}

impl Session {
    /// The binary layout of a session, shared by the sessions journal
    /// and the Kafka aggregates topic: u8 derived | str id (empty for a
    /// derived session, whose id is `<user>:<start>`) | opt user | i64
    /// start | i64 end | u64 events | opt first page | opt last page | u32
    /// n | n × str event type (an opt is u8 0, or u8 1 and a str).
    pub fn encode(&self, e: &mut Enc) {
        e.u8(u8::from(self.derived));
        e.str(if self.derived { "" } else { &self.session_id });
        encode_opt(e, self.user_id.as_deref());
        e.i64(self.start);
        e.i64(self.end);
        e.u64(self.events);
        encode_opt(e, self.first_page.as_deref());
        encode_opt(e, self.last_page.as_deref());
        e.u32(self.event_types.len() as u32);
        for t in &self.event_types {
            e.str(t);
        }
    }

    /// Reads [`Session::encode`]'s layout; a session ending before it
    /// starts or without events is an error.
    pub fn decode(d: &mut Dec<'_>) -> Result<Session, DecodeError> {
        let derived = match d.u8()? {
            0 => false,
            1 => true,
            _ => return d.err("bad derived flag"),
        };
        let id = d.str()?;
        let user_id = decode_opt(d)?.map(str::to_string);
        let start = d.i64()?;
        let end = d.i64()?;
        let events = d.u64()?;
        let first_page = decode_opt(d)?.map(str::to_string);
        let last_page = decode_opt(d)?.map(str::to_string);
        let n = d.count(4)?;
        let mut event_types = BTreeSet::new();
        for _ in 0..n {
            event_types.insert(d.str()?.to_string());
        }
        if end < start || events == 0 {
            return d.err("session ends before it starts or has no events");
        }
        let session_id = if derived {
            format!("{}:{}", user_id.as_deref().unwrap_or(""), start)
        } else {
            id.to_string()
        };
        Ok(Session {
            session_id,
            derived,
            user_id,
            start,
            end,
            events,
            first_page,
            last_page,
            event_types,
        })
    }
}

#[cfg(test)]
mod tests;
