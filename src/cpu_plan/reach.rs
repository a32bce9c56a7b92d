//! Rule 9 in the planner's form: where each vCPU may go, as bit sets over the online pCPUs, one
//! per distinct allowed set.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Where each vCPU may go (rule 9), by pCPU index.
#[derive(Default)]
pub(super) struct Reach {
    /// Per vCPU: `None` when it may go to any pCPU, else the index of its set in `sets`.
    pub(super) set_of: Vec<Option<usize>>,
    /// The distinct sets, each a bit per pCPU (bit `p % 64` of word `p / 64`).
    pub(super) sets: Vec<Vec<u64>>,
}

impl Reach {
    /// No vCPU constrained: every vCPU may go anywhere.
    pub(super) fn anywhere(vcpus: usize) -> Self {
        Self {
            set_of: vec![None; vcpus],
            sets: Vec::new(),
        }
    }

    /// May vCPU `v` be pinned to pCPU `p`?
    pub(super) fn may(&self, v: usize, p: usize) -> bool {
        self.set_of[v].is_none_or(|i| self.allows(i, p))
    }

    /// Does set `i` allow pCPU `p`?
    pub(super) fn allows(&self, i: usize, p: usize) -> bool {
        self.sets[i][p / 64] & (1 << (p % 64)) != 0
    }
}

/// A shared set, by its address and length.
type SetAddress = (*const u32, usize);

/// An interned set: its index in the reach's sets (`None`: no constraint) and its number of
/// online pCPUs.
type Interned = (Option<usize>, usize);

/// Rule 9: the distinct allowed sets as bits over the online pCPUs, one copy per distinct set;
/// a set that allows every online pCPU is no constraint.
#[derive(Default)]
pub(super) struct SetInterner {
    /// Sets are shared between vCPUs (one allocation per distinct set): known by address, so a
    /// set is looked at once, not hashed whole for every vCPU.
    known: HashMap<SetAddress, Interned, BuildHasherDefault<AddressHasher>>,
    /// The last set looked up: the vCPUs of one domain, listed together, usually share one.
    last: Option<(SetAddress, Interned)>,
}

impl SetInterner {
    /// `set`'s index in `reach` (added there on first sight) and its number of online pCPUs, of
    /// the `pcpus` online pCPUs, whose indices `index_of` tells.
    pub(super) fn intern(
        &mut self,
        set: &[u32],
        pcpus: usize,
        index_of: impl Fn(u32) -> Option<usize>,
        reach: &mut Reach,
    ) -> Interned {
        let address = (set.as_ptr(), set.len());
        if let Some((known, found)) = self.last
            && known == address
        {
            return found;
        }
        let found = *self.known.entry(address).or_insert_with(|| {
            let mut bits = vec![0u64; pcpus.div_ceil(64)];
            let mut size = 0;
            for i in set.iter().filter_map(|&p| index_of(p)) {
                if bits[i / 64] & (1 << (i % 64)) == 0 {
                    bits[i / 64] |= 1 << (i % 64);
                    size += 1;
                }
            }
            if size == pcpus {
                return (None, size);
            }
            reach.sets.push(bits);
            (Some(reach.sets.len() - 1), size)
        });
        self.last = Some((address, found));
        found
    }
}

/// A hasher for addresses: they are already unique, so one multiplication spreads them (SipHash,
/// the default, was a sixth of a decision at 10 000 vCPUs).
#[derive(Default)]
struct AddressHasher(u64);

impl Hasher for AddressHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}
