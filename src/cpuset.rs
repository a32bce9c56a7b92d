//! The CPU-list syntax libvirt, the kernel and `--cpus` share (`0-3,6,^2`): the one place it is
//! read.

/// Parse a CPU list as libvirt and the kernel write it (`0-3,6,^2`) into sorted pCPU numbers;
/// `None` when malformed or empty.
pub fn parse(list: &str) -> Option<Vec<u32>> {
    let mut cpus = std::collections::BTreeSet::new();
    let mut excluded = Vec::new();
    for part in list.split(',').map(str::trim) {
        if let Some(cpu) = part.strip_prefix('^') {
            excluded.push(cpu.parse::<u32>().ok()?);
        } else if let Some((lo, hi)) = part.split_once('-') {
            let (lo, hi) = (
                lo.trim().parse::<u32>().ok()?,
                hi.trim().parse::<u32>().ok()?,
            );
            if lo > hi || hi - lo > 65_535 {
                return None;
            }
            cpus.extend(lo..=hi);
        } else {
            cpus.insert(part.parse::<u32>().ok()?);
        }
    }
    for cpu in excluded {
        cpus.remove(&cpu);
    }
    (!cpus.is_empty()).then(|| cpus.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_as_libvirt_writes_them() {
        assert_eq!(parse("1"), Some(vec![1]));
        assert_eq!(parse("0-3"), Some(vec![0, 1, 2, 3]));
        assert_eq!(parse("0-3,^2,6"), Some(vec![0, 1, 3, 6]));
        assert_eq!(parse("5,1,1"), Some(vec![1, 5]));
        for bad in ["", "x", "3-1", "1,", "^1", "0-", "-1", "1-2-3"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
