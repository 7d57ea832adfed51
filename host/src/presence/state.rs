//! The presence of one topic as a delta-state observed-remove set (as Phoenix.Tracker keeps
//! it): every tracked entry carries a unique dot (replica, counter); a causal context
//! records every dot a replica has seen, so a removal wins over the add it observed and
//! deltas can arrive in any order, any number of times.
//!
//! Pure: no I/O, no clocks, no locks. A mutation returns the delta to ship to other replicas
//! and applies it locally; [`State::merge`] applies a delta (or a whole state) and returns
//! what joined and left, which is what `presence_diff` reports. Only a replica adds or
//! removes entries with its own dots, so what one replica knows of its own entries
//! ([`State::own`]) is all another needs from it; a replica that is gone has its entries
//! dropped by each survivor ([`State::drop_replica`]). Deltas travel as JSON
//! ([`Delta::to_wire`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

/// Identifies a replica (a node's tracker).
pub type Replica = u64;

/// A unique event: the `counter`-th addition by `replica`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Dot {
    /// Who added it.
    pub replica: Replica,
    /// Its sequence number at that replica, from 1.
    pub counter: u64,
}

/// One tracked presence: a key (e.g. a user id) with its metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The presence key; one key may have several entries (several tabs).
    pub key: String,
    /// Who tracked it on its replica (a channel); lets a replica drop a channel's entries.
    pub owner: u64,
    /// The metadata, a JSON object as text, without `phx_ref`.
    pub meta: String,
    /// For an update: the ref of the entry this one replaces.
    pub prev: Option<Dot>,
}

/// Every dot seen: a version vector for the contiguous prefix of each replica plus the dots
/// seen beyond it. Kept compact, so equal knowledge is equal data.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Context {
    vv: BTreeMap<Replica, u64>,
    cloud: BTreeSet<Dot>,
}

impl Context {
    /// Whether `dot` was seen.
    pub fn contains(&self, dot: &Dot) -> bool {
        self.vv.get(&dot.replica).is_some_and(|c| dot.counter <= *c) || self.cloud.contains(dot)
    }

    /// How many dots this context holds.
    fn len(&self) -> u64 {
        self.vv.values().sum::<u64>() + self.cloud.len() as u64
    }

    /// Every dot this context holds.
    fn dots(&self) -> impl Iterator<Item = Dot> + '_ {
        let prefix = self.vv.iter().flat_map(|(r, c)| {
            (1..=*c).map(|counter| Dot {
                replica: *r,
                counter,
            })
        });
        prefix.chain(self.cloud.iter().copied())
    }

    fn insert(&mut self, dot: Dot) {
        if !self.contains(&dot) {
            self.cloud.insert(dot);
            self.compact();
        }
    }

    /// The dots of `replica` only.
    fn only(&self, replica: Replica) -> Context {
        Context {
            vv: self
                .vv
                .get_key_value(&replica)
                .map(|(r, c)| (*r, *c))
                .into_iter()
                .collect(),
            cloud: self
                .cloud
                .iter()
                .filter(|d| d.replica == replica)
                .copied()
                .collect(),
        }
    }

    fn join(&mut self, other: &Context) {
        for (replica, counter) in &other.vv {
            let mine = self.vv.entry(*replica).or_insert(0);
            *mine = (*mine).max(*counter);
        }
        self.cloud.extend(other.cloud.iter().copied());
        self.compact();
    }

    /// Moves dots that extend a replica's contiguous prefix into the version vector.
    fn compact(&mut self) {
        let cloud = std::mem::take(&mut self.cloud);
        for dot in cloud {
            let counter = self.vv.entry(dot.replica).or_insert(0);
            if dot.counter == *counter + 1 {
                *counter += 1;
            } else if dot.counter > *counter {
                self.cloud.insert(dot);
            }
        }
        // One pass suffices: the cloud is ordered by (replica, counter).
        self.vv.retain(|_, c| *c > 0);
    }
}

/// A delta: entries added and the context they and any removals come with. A whole state
/// is a delta too (for a full sync).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// Dots seen, including removed ones.
    pub context: Context,
    /// Entries present.
    pub entries: BTreeMap<Dot, Entry>,
}

/// A delta as it travels between nodes (JSON has no struct keys).
#[derive(Serialize, Deserialize)]
struct Wire {
    vv: Vec<(Replica, u64)>,
    cloud: Vec<Dot>,
    entries: Vec<(Dot, Entry)>,
}

impl Delta {
    /// Adds what `other` holds: both contexts, both sets of entries.
    pub fn absorb(&mut self, other: Delta) {
        self.context.join(&other.context);
        self.entries.extend(other.entries);
    }

    /// Whether it says nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.context.vv.is_empty() && self.context.cloud.is_empty()
    }

    /// Its wire form.
    pub fn to_wire(&self) -> serde_json::Value {
        serde_json::to_value(Wire {
            vv: self.context.vv.iter().map(|(r, c)| (*r, *c)).collect(),
            cloud: self.context.cloud.iter().copied().collect(),
            entries: self.entries.iter().map(|(d, e)| (*d, e.clone())).collect(),
        })
        .unwrap_or_default()
    }

    /// A delta from its wire form; `None` for anything else.
    pub fn from_wire(value: serde_json::Value) -> Option<Delta> {
        let wire: Wire = serde_json::from_value(value).ok()?;
        let mut context = Context {
            vv: wire.vv.into_iter().collect(),
            cloud: wire.cloud.into_iter().collect(),
        };
        context.compact();
        Some(Delta {
            context,
            entries: wire.entries.into_iter().collect(),
        })
    }
}

/// What a merge changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// Entries that appeared.
    pub joins: Vec<(Dot, Entry)>,
    /// Entries that went away.
    pub leaves: Vec<(Dot, Entry)>,
}

impl Diff {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.joins.is_empty() && self.leaves.is_empty()
    }
}

/// One replica's view of a topic's presence.
#[derive(Clone, Debug)]
pub struct State {
    replica: Replica,
    counter: u64,
    context: Context,
    entries: HashMap<Dot, Entry>,
    /// Index: key -> its entries' dots, in insertion order, for listing by key.
    by_key: BTreeMap<String, Vec<Dot>>,
}

impl State {
    /// An empty state for `replica`.
    pub fn new(replica: Replica) -> Self {
        State {
            replica,
            counter: 0,
            context: Context::default(),
            entries: HashMap::new(),
            by_key: BTreeMap::new(),
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no one is present.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry with this dot.
    pub fn get(&self, dot: &Dot) -> Option<&Entry> {
        self.entries.get(dot)
    }

    /// Keys with their entries, keys in order, entries in the order they joined.
    pub fn by_key(&self) -> impl Iterator<Item = (&str, impl Iterator<Item = (&Dot, &Entry)>)> {
        self.by_key.iter().map(|(key, dots)| {
            let entries = dots.iter().filter_map(|d| self.entries.get_key_value(d));
            (key.as_str(), entries)
        })
    }

    /// Tracks `key` for `owner` with `meta`: a new entry with a fresh dot. `prev` marks an
    /// update of an entry this replica just removed.
    pub fn add(&mut self, key: &str, owner: u64, meta: String, prev: Option<Dot>) -> (Delta, Diff) {
        self.counter += 1;
        let dot = Dot {
            replica: self.replica,
            counter: self.counter,
        };
        let entry = Entry {
            key: key.to_owned(),
            owner,
            meta,
            prev,
        };
        let mut delta = Delta::default();
        delta.context.insert(dot);
        delta.entries.insert(dot, entry);
        let diff = self.merge(&delta);
        (delta, diff)
    }

    /// Removes entries by dot (observed-remove: only what this replica has seen).
    pub fn remove(&mut self, dots: &[Dot]) -> (Delta, Diff) {
        let mut delta = Delta::default();
        for dot in dots {
            if self.entries.contains_key(dot) {
                delta.context.insert(*dot);
            }
        }
        let diff = self.merge(&delta);
        (delta, diff)
    }

    /// Applies a delta or a whole state: entries it has that this replica has not seen
    /// join; entries this replica has that the delta saw but no longer has leave.
    pub fn merge(&mut self, delta: &Delta) -> Diff {
        let mut diff = Diff::default();
        for (dot, entry) in &delta.entries {
            if !self.entries.contains_key(dot) && !self.context.contains(dot) {
                self.insert(*dot, entry.clone());
                diff.joins.push((*dot, entry.clone()));
            }
        }
        // Entries the delta saw but no longer has. Walk whichever side is smaller, so a
        // local join or leave costs O(1), not O(entries).
        let removed = |dot: &Dot| !delta.entries.contains_key(dot);
        let gone: Vec<Dot> = if delta.context.len() < self.entries.len() as u64 {
            delta
                .context
                .dots()
                .filter(|d| self.entries.contains_key(d) && removed(d))
                .collect()
        } else {
            self.entries
                .keys()
                .filter(|d| delta.context.contains(d) && removed(d))
                .copied()
                .collect()
        };
        for dot in gone {
            if let Some(entry) = self.take(&dot) {
                diff.leaves.push((dot, entry));
            }
        }
        self.context.join(&delta.context);
        diff
    }

    /// What this replica knows of its own entries (those it added and those it removed):
    /// all another replica needs from it, for a full sync.
    pub fn own(&self) -> Delta {
        Delta {
            context: self.context.only(self.replica),
            entries: self
                .entries
                .iter()
                .filter(|(d, _)| d.replica == self.replica)
                .map(|(d, e)| (*d, e.clone()))
                .collect(),
        }
    }

    /// Drops every entry of `replica` (a node that is gone) and forgets its dots: its
    /// entries leave here, and should it prove alive after all, its own view merged again
    /// brings them back.
    pub fn drop_replica(&mut self, replica: Replica) -> Diff {
        let dots: Vec<Dot> = self
            .entries
            .keys()
            .filter(|d| d.replica == replica)
            .copied()
            .collect();
        let mut diff = Diff::default();
        for dot in dots {
            if let Some(entry) = self.take(&dot) {
                diff.leaves.push((dot, entry));
            }
        }
        self.context.vv.remove(&replica);
        self.context.cloud.retain(|d| d.replica != replica);
        diff
    }

    /// The whole state as a delta, for a replica that knows nothing yet.
    pub fn to_delta(&self) -> Delta {
        Delta {
            context: self.context.clone(),
            entries: self.entries.iter().map(|(d, e)| (*d, e.clone())).collect(),
        }
    }

    fn insert(&mut self, dot: Dot, entry: Entry) {
        self.by_key.entry(entry.key.clone()).or_default().push(dot);
        self.entries.insert(dot, entry);
    }

    fn take(&mut self, dot: &Dot) -> Option<Entry> {
        let entry = self.entries.remove(dot)?;
        if let Some(dots) = self.by_key.get_mut(&entry.key) {
            dots.retain(|d| d != dot);
            if dots.is_empty() {
                self.by_key.remove(&entry.key);
            }
        }
        Some(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn meta(n: u8) -> String {
        format!("{{\"n\":{n}}}")
    }

    #[test]
    fn add_then_remove_joins_then_leaves() {
        let mut s = State::new(1);
        let (_, diff) = s.add("u1", 7, meta(1), None);
        assert_eq!(diff.joins.len(), 1);
        let dot = diff.joins[0].0;
        assert_eq!(s.len(), 1);
        let (_, diff) = s.remove(&[dot]);
        let entry = Entry {
            key: "u1".into(),
            owner: 7,
            meta: meta(1),
            prev: None,
        };
        assert_eq!(diff.leaves, vec![(dot, entry)]);
        assert!(s.is_empty());
    }

    #[test]
    fn one_key_may_have_several_entries() {
        let mut s = State::new(1);
        s.add("u1", 1, meta(1), None);
        s.add("u1", 2, meta(2), None);
        s.add("u2", 3, meta(3), None);
        let keys: Vec<(String, usize)> = s
            .by_key()
            .map(|(k, es)| (k.to_owned(), es.count()))
            .collect();
        assert_eq!(keys, vec![("u1".into(), 2), ("u2".into(), 1)]);
    }

    #[test]
    fn a_removal_that_arrives_before_its_add_wins() {
        let mut a = State::new(1);
        let mut b = State::new(2);
        let (add, _) = a.add("u", 1, meta(1), None);
        let (remove, _) = a.remove(&[add.entries.keys().copied().next().expect("a dot")]);
        assert!(b.merge(&remove).is_empty());
        assert!(
            b.merge(&add).is_empty(),
            "the add was already observed removed"
        );
        assert!(b.is_empty());
    }

    /// An operation at one replica of a small cluster.
    #[derive(Clone, Debug)]
    enum Op {
        Add {
            replica: usize,
            key: u8,
            meta: u8,
        },
        Remove {
            replica: usize,
            pick: usize,
        },
        /// `to` merges the whole state of `from` (an anti-entropy round).
        Sync {
            from: usize,
            to: usize,
        },
    }

    fn op(replicas: usize) -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..replicas, 0u8..4, any::<u8>()).prop_map(|(replica, key, meta)| Op::Add {
                replica,
                key,
                meta
            }),
            (0..replicas, any::<usize>()).prop_map(|(replica, pick)| Op::Remove { replica, pick }),
            (0..replicas, 0..replicas).prop_map(|(from, to)| Op::Sync { from, to }),
        ]
    }

    /// Runs ops, each at its replica; returns every delta the adds and removes produced.
    fn run(replicas: &mut [State], ops: &[Op]) -> Vec<Delta> {
        let mut deltas = Vec::new();
        for op in ops {
            match *op {
                Op::Add {
                    replica,
                    key,
                    meta: m,
                } => {
                    deltas.push(
                        replicas[replica]
                            .add(&format!("k{key}"), 0, meta(m), None)
                            .0,
                    );
                }
                Op::Remove { replica, pick } => {
                    let state = &mut replicas[replica];
                    let mut dots: Vec<Dot> = state.entries.keys().copied().collect();
                    dots.sort();
                    if !dots.is_empty() {
                        let dot = dots[pick % dots.len()];
                        deltas.push(state.remove(&[dot]).0);
                    }
                }
                Op::Sync { from, to } => {
                    let full = replicas[from].to_delta();
                    replicas[to].merge(&full);
                }
            }
        }
        deltas
    }

    fn same(a: &State, b: &State) -> bool {
        a.context == b.context && a.entries == b.entries
    }

    fn joined(a: &State, b: &State) -> State {
        let mut out = a.clone();
        out.merge(&b.to_delta());
        out
    }

    /// Three replicas of one cluster after random adds, removes and partial syncs: the
    /// states a merge can meet (each replica's dots are its own; removals follow adds).
    fn arb_cluster() -> impl Strategy<Value = (State, State, State)> {
        proptest::collection::vec(op(3), 0..30).prop_map(|ops| {
            let mut replicas: Vec<State> = (0..3).map(State::new).collect();
            run(&mut replicas, &ops);
            let c = replicas.pop().expect("three");
            let b = replicas.pop().expect("three");
            let a = replicas.pop().expect("three");
            (a, b, c)
        })
    }

    proptest! {
        /// As the tracker runs it (each replica removes only its own entries, and replicas
        /// exchange their own views): a replica that knew nothing rebuilds every entry from
        /// the others' own views, through the wire form; a replica dropped as gone leaves,
        /// and comes back whole when its own view is merged again (it was alive after all).
        #[test]
        fn own_views_rebuild_the_whole_and_a_dropped_replica_stays_gone(
            ops in proptest::collection::vec(op(3), 0..40),
        ) {
            let mut replicas: Vec<State> = (0..3).map(State::new).collect();
            for op in &ops {
                match *op {
                    Op::Add { replica, key, meta: m } => {
                        replicas[replica].add(&format!("k{key}"), 0, meta(m), None);
                    }
                    Op::Remove { replica, pick } => {
                        let state = &mut replicas[replica];
                        let own: Vec<Dot> = state.own().entries.keys().copied().collect();
                        if !own.is_empty() {
                            state.remove(&[own[pick % own.len()]]);
                        }
                    }
                    Op::Sync { from, to } => {
                        let view = replicas[from].own();
                        replicas[to].merge(&view);
                    }
                }
            }
            let mut fresh = State::new(9);
            for r in &replicas {
                let wire = Delta::from_wire(r.own().to_wire()).expect("round trips");
                prop_assert_eq!(&wire, &r.own());
                fresh.merge(&wire);
            }
            let mut want: Vec<Dot> = replicas.iter().flat_map(|r| r.own().entries.into_keys()).collect();
            want.sort();
            let mut have: Vec<Dot> = fresh.entries.keys().copied().collect();
            have.sort();
            prop_assert_eq!(&have, &want);

            let gone = fresh.drop_replica(0);
            prop_assert_eq!(gone.leaves.len(), replicas[0].own().entries.len());
            prop_assert!(fresh.entries.keys().all(|d| d.replica != 0));
            let back = fresh.merge(&replicas[0].own());
            prop_assert_eq!(back.joins.len(), replicas[0].own().entries.len());
            let mut again: Vec<Dot> = fresh.entries.keys().copied().collect();
            again.sort();
            prop_assert_eq!(&again, &want);
        }

        #[test]
        fn merge_is_commutative((a, b, _) in arb_cluster()) {
            prop_assert!(same(&joined(&a, &b), &joined(&b, &a)));
        }

        #[test]
        fn merge_is_associative((a, b, c) in arb_cluster()) {
            prop_assert!(same(&joined(&joined(&a, &b), &c), &joined(&a, &joined(&b, &c))));
        }

        #[test]
        fn merge_is_idempotent((a, b, _) in arb_cluster()) {
            let once = joined(&a, &b);
            prop_assert!(same(&joined(&once, &b), &once));
            prop_assert!(same(&joined(&a, &a), &a));
        }

        /// Every replica gets every delta, shuffled and duplicated: all converge, and to what
        /// the replicas that made the deltas see once they have exchanged them.
        #[test]
        fn replicas_converge_under_any_delivery_order_and_duplication(
            ops in proptest::collection::vec(op(3), 0..40),
            order in proptest::collection::vec(any::<usize>(), 0..200),
            dupes in proptest::collection::vec(any::<usize>(), 0..40),
        ) {
            let mut origin: Vec<State> = (0..3).map(State::new).collect();
            let deltas = run(&mut origin, &ops);
            let mut receivers: Vec<State> = (10..13).map(State::new).collect();
            for r in receivers.iter_mut() {
                let mut queue: Vec<&Delta> = deltas.iter().collect();
                queue.extend(dupes.iter().filter(|_| !deltas.is_empty()).map(|i| &deltas[i % deltas.len()]));
                for (i, j) in order.iter().enumerate() {
                    if !queue.is_empty() {
                        let len = queue.len();
                        queue.swap(i % len, j % len);
                    }
                }
                for d in queue {
                    r.merge(d);
                }
            }
            for r in &receivers[1..] {
                prop_assert!(same(r, &receivers[0]));
            }
            for origin in &origin {
                let mut all = origin.clone();
                for d in &deltas {
                    all.merge(d);
                }
                prop_assert_eq!(&all.entries, &receivers[0].entries);
            }
        }
    }
}
