//! Rule 9 in the planner's form: where each vCPU may go, as bit sets over the online pCPUs, one
//! per distinct allowed set.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Where each vCPU may go (rule 9), by pCPU index.
#[derive(Default)]
pub(super) struct Reach {
    /// Per vCPU: `None` when it may go to any pCPU, else the index of its set in `sets`.
    pub(super) set_of: Vec<Option<usize>>,
    /// The distinct sets.
    pub(super) sets: Vec<PcpuSet>,
}

/// A set of pCPUs by index, a bit each (bit `p % 64` of word `p / 64`).
pub(super) struct PcpuSet(Vec<u64>);

impl PcpuSet {
    /// The empty set, of `pcpus` pCPUs.
    fn empty(pcpus: usize) -> Self {
        Self(vec![0; pcpus.div_ceil(64)])
    }

    /// Does it hold pCPU `p`?
    pub(super) fn contains(&self, p: usize) -> bool {
        self.0[p / 64] & (1 << (p % 64)) != 0
    }

    /// Add pCPU `p`; false when it was there already.
    fn insert(&mut self, p: usize) -> bool {
        let had = self.contains(p);
        self.0[p / 64] |= 1 << (p % 64);
        !had
    }

    /// Its pCPUs, ascending: a word at a time, so a set of one pCPU on a large host costs its
    /// words, not its pCPUs.
    pub(super) fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(w, &word)| {
            let mut rest = word;
            std::iter::from_fn(move || {
                (rest != 0).then(|| {
                    let bit = rest.trailing_zeros() as usize;
                    rest &= rest - 1;
                    w * 64 + bit
                })
            })
        })
    }
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
        self.sets[i].contains(p)
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
            let mut bits = PcpuSet::empty(pcpus);
            let mut size = 0;
            for i in set.iter().filter_map(|&p| index_of(p)) {
                size += usize::from(bits.insert(i));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pcpu_set_lists_its_pcpus_across_words() {
        let mut set = PcpuSet::empty(200);
        for p in [130, 0, 63, 64, 199] {
            assert!(set.insert(p));
        }
        assert!(!set.insert(64));
        assert_eq!(set.iter().collect::<Vec<_>>(), [0, 63, 64, 130, 199]);
        assert!(set.contains(130) && !set.contains(131));
        assert_eq!(PcpuSet::empty(200).iter().count(), 0);
    }
}
