//! The metadata tree: leaves hold the blocks' entries, inner nodes the records (slot, MAC)
//! of their children, the header the root's record. A node is loaded on demand and kept in
//! a bounded cache; nothing scales with the disk in memory but what was written since the
//! last commit, and that is bounded too (the caller commits early when it grows).
//!
//! Crash safety: a node is never written over its committed version. Between commits a
//! written leaf goes to its other slot, stamped with the next generation; a commit writes
//! the changed inner nodes to their other slots, flushes, writes the header copy that does
//! not hold the committed header, and flushes again. After a crash the committed tree is
//! intact, and a leaf's other slot is taken as its newest version only if it verifies and
//! carries exactly the next generation (written after the last commit): such a leaf is
//! *adopted* and committed by the next commit. An older version there (of a previous
//! generation) is never taken, so putting back an old leaf is refused, not believed.

use crate::layout::{Geometry, Header, HEADER_BYTES};
use crate::node::{self, Body, Child, Entry, LEAF_ENTRIES, NODE_RECORDS};
use interceptor_sdk::Lower;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::num::NonZeroUsize;

type Key = (u32, u64);

/// One node in memory.
pub struct Node {
    /// The parent's record of this node's committed version.
    committed: Child,
    pub body: Body,
    /// The MAC of this body as stored in the node's other slot, once written there.
    written: Option<[u8; 16]>,
    /// Taken from the other slot after a crash: the caller resolves its entries first.
    pub adopted: bool,
}

impl Node {
    pub fn entries(&self) -> &[Entry; LEAF_ENTRIES] {
        match &self.body {
            Body::Leaf(e) => e,
            Body::Inner(_) => &EMPTY_LEAF,
        }
    }

    pub fn entries_mut(&mut self) -> Option<&mut [Entry; LEAF_ENTRIES]> {
        match &mut self.body {
            Body::Leaf(e) => Some(e),
            Body::Inner(_) => None,
        }
    }
}

static EMPTY_LEAF: [Entry; LEAF_ENTRIES] = [Entry {
    cur: node::Current::Never,
    prev: None,
}; LEAF_ENTRIES];

type Res<T> = Result<T, String>;

fn io(e: interceptor_sdk::IoError) -> String {
    e.to_string()
}

pub struct Tree {
    geo: Geometry,
    key: [u8; 32],
    /// The committed header, and which copy (0 or 1) holds it.
    header: Header,
    copy: usize,
    clean: lru::LruCache<Key, Node>,
    /// Leaves changed since the last commit (pinned until it).
    dirty: BTreeMap<Key, Node>,
    /// Nodes found damaged on load.
    pub damaged: u64,
    /// Leaves adopted from a crash's leftovers.
    pub adopted: u64,
    /// A commit failed part way: memory may no longer match the disk, refuse all I/O.
    broken: bool,
}

impl Tree {
    pub fn new(
        geo: Geometry,
        key: [u8; 32],
        header: Header,
        copy: usize,
        cache_nodes: usize,
    ) -> Tree {
        Tree {
            geo,
            key,
            header,
            copy,
            clean: lru::LruCache::new(NonZeroUsize::new(cache_nodes).unwrap_or(NonZeroUsize::MIN)),
            dirty: BTreeMap::new(),
            damaged: 0,
            adopted: 0,
            broken: false,
        }
    }

    pub fn generation(&self) -> u64 {
        self.header.generation
    }

    pub fn dirty_leaves(&self) -> usize {
        self.dirty.len()
    }

    pub fn cached_nodes(&self) -> usize {
        self.clean.len() + self.dirty.len()
    }

    fn check(&self) -> Res<()> {
        if self.broken {
            return Err("an earlier commit failed; reopen the disk".into());
        }
        Ok(())
    }

    /// The committed record of node `index` of `level`.
    fn record(&mut self, lower: &Lower, level: u32, index: u64) -> Res<Child> {
        if level == self.geo.top() {
            return Ok(self.header.root);
        }
        let parent = self.load(lower, level + 1, index / NODE_RECORDS as u64)?;
        match &parent.body {
            Body::Inner(c) => Ok(c[(index % NODE_RECORDS as u64) as usize]),
            Body::Leaf(_) => Err("tree level mismatch".into()),
        }
    }

    /// Node `index` of `level`, loaded (and verified) if it is not in memory.
    fn load(&mut self, lower: &Lower, level: u32, index: u64) -> Res<&mut Node> {
        let k = (level, index);
        if !self.dirty.contains_key(&k) && !self.clean.contains(&k) {
            let node = self.read_node(lower, level, index)?;
            if node.adopted {
                self.adopted += 1;
                self.dirty.insert(k, node);
            } else {
                self.clean.push(k, node);
            }
        }
        match self.dirty.get_mut(&k) {
            Some(n) => Ok(n),
            None => self
                .clean
                .get_mut(&k)
                .ok_or_else(|| "node cache lost a node".into()),
        }
    }

    fn read_node(&mut self, lower: &Lower, level: u32, index: u64) -> Res<Node> {
        let committed = self.record(lower, level, index)?;
        let lv = self.geo.levels[level as usize];
        let size = lv.node_bytes as usize;
        // A leaf's two slots are read together: the other may hold a crash's leftovers.
        let both = level == 0;
        let mut raw = vec![0u8; if both { 2 * size } else { size }];
        let first = match committed {
            Child::At { slot, .. } if !both => slot,
            _ => 0,
        };
        if both || matches!(committed, Child::At { .. }) {
            lower
                .read(lv.slot_offset(index, first), &mut raw)
                .map_err(io)?;
        }
        let slot_bytes = |slot: u8| {
            let at = if both { usize::from(slot) * size } else { 0 };
            &raw[at..at + size]
        };
        let mut body = match committed {
            Child::Empty => Body::empty(level),
            Child::Unreadable => Body::unreadable(level),
            Child::At { slot, mac } => {
                match node::decode(slot_bytes(slot), level, index, &self.key) {
                    Some(d) if d.mac == mac => d.body,
                    _ => {
                        self.damaged += 1;
                        Body::unreadable(level)
                    }
                }
            }
        };
        if both {
            let next = committed.next_slot();
            let want = self.header.generation.checked_add(1);
            if let Some(d) = node::decode(slot_bytes(next), level, index, &self.key) {
                if Some(d.generation) == want {
                    return Ok(Node {
                        committed,
                        body: d.body,
                        written: None,
                        adopted: true,
                    });
                }
            }
            // Committed: its fallbacks were settled by that commit.
            if let Body::Leaf(entries) = &mut body {
                for e in entries.iter_mut() {
                    e.prev = None;
                }
            }
        }
        Ok(Node {
            committed,
            body,
            written: None,
            adopted: false,
        })
    }

    /// The leaf holding guest block `block`'s entry, and the entry's index in it.
    pub fn leaf(&mut self, lower: &Lower, block: u64) -> Res<(&mut Node, usize)> {
        self.check()?;
        let (i, k) = (
            block / LEAF_ENTRIES as u64,
            (block % LEAF_ENTRIES as u64) as usize,
        );
        Ok((self.load(lower, 0, i)?, k))
    }

    /// Sets `block`'s entry; the leaf stays in memory until the next commit.
    pub fn set_entry(&mut self, lower: &Lower, block: u64, entry: Entry) -> Res<()> {
        self.check()?;
        let (i, k) = (
            block / LEAF_ENTRIES as u64,
            (block % LEAF_ENTRIES as u64) as usize,
        );
        let key = (0, i);
        self.load(lower, 0, i)?;
        if let Some(n) = self.clean.pop(&key) {
            self.dirty.insert(key, n);
        }
        let node = self.dirty.get_mut(&key).ok_or("leaf not loaded")?;
        node.written = None;
        node.entries_mut().ok_or("tree level mismatch")?[k] = entry;
        Ok(())
    }

    /// Writes the leaf of `block` (changed by the caller) to its other slot; it stays in
    /// memory until the next commit.
    pub fn store_leaf(&mut self, lower: &Lower, block: u64) -> Res<()> {
        self.check()?;
        let i = block / LEAF_ENTRIES as u64;
        let k = (0, i);
        if let Some(n) = self.clean.pop(&k) {
            self.dirty.insert(k, n);
        }
        let gen = self.next_generation()?;
        let lv = self.geo.levels[0];
        let node = self.dirty.get_mut(&k).ok_or("leaf not loaded")?;
        node.written = None;
        let (raw, mac) = node::encode(&node.body, 0, i, gen, &self.key);
        lower
            .write(lv.slot_offset(i, node.committed.next_slot()), &raw)
            .map_err(io)?;
        node.written = Some(mac);
        Ok(())
    }

    /// Whether a write may start: it must be able to commit.
    pub fn writable(&self) -> Res<()> {
        self.check()?;
        self.next_generation().map(|_| ())
    }

    fn next_generation(&self) -> Res<u64> {
        self.header
            .generation
            .checked_add(1)
            .ok_or_else(|| "the disk has used all its generations".into())
    }

    /// Makes everything written durable: the guest's flush. With changes since the last
    /// commit: writes the changed path to the root, flushes, writes the header, flushes.
    pub fn commit(&mut self, lower: &Lower, header_key: &[u8; 32]) -> Res<()> {
        self.check()?;
        if self.dirty.is_empty() {
            return lower.flush().map_err(io);
        }
        let result = self.try_commit(lower, header_key);
        if result.is_err() {
            self.broken = true;
        }
        result
    }

    fn try_commit(&mut self, lower: &Lower, header_key: &[u8; 32]) -> Res<()> {
        let gen = self.next_generation()?;
        let mut records: HashMap<Key, Child> = HashMap::new();
        let mut bodies: HashMap<Key, Body> = HashMap::new();
        let leaves: Vec<u64> = self.dirty.keys().map(|&(_, i)| i).collect();
        for &i in &leaves {
            let lv = self.geo.levels[0];
            let node = self.dirty.get_mut(&(0, i)).ok_or("dirty leaf lost")?;
            let next = node.committed.next_slot();
            let mac = match node.written {
                Some(m) => m,
                None => {
                    let (raw, m) = node::encode(&node.body, 0, i, gen, &self.key);
                    lower.write(lv.slot_offset(i, next), &raw).map_err(io)?;
                    node.written = Some(m);
                    m
                }
            };
            records.insert((0, i), Child::At { slot: next, mac });
        }
        let mut changed: BTreeSet<u64> = leaves.into_iter().collect();
        for level in 1..=self.geo.top() {
            let parents: BTreeSet<u64> = changed.iter().map(|c| c / NODE_RECORDS as u64).collect();
            for &p in &parents {
                let node = self.load(lower, level, p)?;
                let next = node.committed.next_slot();
                let mut body = node.body.clone();
                if let Body::Inner(children) = &mut body {
                    let first = p * NODE_RECORDS as u64;
                    for (k, c) in children.iter_mut().enumerate() {
                        if let Some(r) = records.get(&(level - 1, first + k as u64)) {
                            *c = *r;
                        }
                    }
                }
                let (raw, mac) = node::encode(&body, level, p, gen, &self.key);
                let lv = self.geo.levels[level as usize];
                lower.write(lv.slot_offset(p, next), &raw).map_err(io)?;
                records.insert((level, p), Child::At { slot: next, mac });
                bodies.insert((level, p), body);
            }
            changed = parents;
        }
        let root = *records
            .get(&(self.geo.top(), 0))
            .ok_or("commit reached no root")?;
        lower.flush().map_err(io)?;
        let header = Header {
            generation: gen,
            root,
            ..self.header.clone()
        };
        let copy = 1 - self.copy;
        lower
            .write((copy * HEADER_BYTES) as u64, &header.encode(header_key))
            .map_err(io)?;
        lower.flush().map_err(io)?;
        // Committed: memory follows.
        self.header = header;
        self.copy = copy;
        for (k, rec) in records {
            if k.0 == 0 {
                if let Some(mut n) = self.dirty.remove(&k) {
                    n.committed = rec;
                    n.written = None;
                    n.adopted = false;
                    if let Some(entries) = n.entries_mut() {
                        for e in entries.iter_mut() {
                            e.prev = None;
                        }
                    }
                    self.clean.push(k, n);
                }
            } else if let Some(n) = self.clean.get_mut(&k) {
                n.committed = rec;
                if let Some(b) = bodies.remove(&k) {
                    n.body = b;
                }
            }
        }
        Ok(())
    }
}
