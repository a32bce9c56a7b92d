//! Safe wrappers over the few libvirt calls that `virt` 0.5 does not wrap.
//!
//! Every `unsafe` block in the crate lives in this file and in `events.rs`. Each wrapper owns the buffers it hands
//! to libvirt, sizes them from libvirt's own answers, and frees what libvirt allocated, so callers
//! only ever see owned Rust values.

use std::os::raw::{c_int, c_uchar, c_uint, c_void};
use std::time::Duration;

use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::Error;
use virt::sys;

unsafe extern "C" {
    /// The C library's `free`, which libvirt's documentation names for buffers it allocates.
    fn free(ptr: *mut c_void);
}

/// Bytes needed for a CPU bitmap of `cpus` CPUs (libvirt's `VIR_CPU_MAPLEN`).
pub fn cpu_map_len(cpus: u32) -> usize {
    cpus.div_ceil(8) as usize
}

/// The CPU numbers set in a libvirt CPU bitmap (bit `n % 8` of byte `n / 8` is CPU `n`), limited to
/// the first `cpus` bits.
pub fn cpus_in_map(map: &[u8], cpus: u32) -> Vec<u32> {
    (0..cpus)
        .filter(|&cpu| {
            map.get((cpu / 8) as usize)
                .is_some_and(|byte| byte & (1 << (cpu % 8)) != 0)
        })
        .collect()
}

/// A libvirt CPU bitmap of `cpus` CPUs (at least) with exactly the CPUs `set` set.
pub fn map_of_cpus(set: &[u32], cpus: u32) -> Vec<u8> {
    let top = set.iter().map(|&c| c + 1).max().unwrap_or(0);
    let mut map = vec![0u8; cpu_map_len(cpus.max(top))];
    for &cpu in set {
        map[(cpu / 8) as usize] |= 1 << (cpu % 8);
    }
    map
}

/// `virNodeGetCPUMap`: the number of CPUs present on the host and the online ones.
pub fn node_cpu_map(conn: &Connect) -> Result<(u32, Vec<u32>), Error> {
    let mut map: *mut c_uchar = std::ptr::null_mut();
    let mut online: c_uint = 0;
    // SAFETY: `conn` holds a live connection pointer. libvirt allocates `map` (sized for the
    // returned CPU count) and hands its ownership to us; we copy it and free it exactly once.
    let present = unsafe { sys::virNodeGetCPUMap(conn.as_ptr(), &mut map, &mut online, 0) };
    if present < 0 {
        return Err(Error::last_error());
    }
    let present = present as u32;
    let online_cpus = if map.is_null() {
        Vec::new()
    } else {
        // SAFETY: libvirt returned a bitmap of VIR_CPU_MAPLEN(present) bytes at `map`.
        let bytes = unsafe { std::slice::from_raw_parts(map, cpu_map_len(present)) }.to_vec();
        // SAFETY: `map` was allocated by libvirt with malloc and is not used after this.
        unsafe { free(map.cast()) };
        cpus_in_map(&bytes, present)
    };
    Ok((present, online_cpus))
}

/// One vCPU as `virDomainGetVcpus` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawVcpu {
    /// vCPU number.
    pub number: u32,
    /// Cumulative CPU time, ns.
    pub cpu_time_ns: u64,
    /// Real CPU it last ran on; negative when unknown.
    pub cpu: i32,
    /// Affinity bitmap, decoded.
    pub affinity: Vec<u32>,
}

/// `virDomainGetVcpus`: every online vCPU of a running domain with its CPU time, last pCPU and
/// affinity, for a host with `present_cpus` pCPUs.
pub fn domain_vcpus(dom: &Domain, present_cpus: u32) -> Result<Vec<RawVcpu>, Error> {
    let nvcpus = dom.info()?.nr_virt_cpu as usize;
    if nvcpus == 0 {
        return Ok(Vec::new());
    }
    let maplen = cpu_map_len(present_cpus.max(1));
    let mut info = vec![
        sys::virVcpuInfo {
            number: 0,
            state: 0,
            cpuTime: 0,
            cpu: -1,
        };
        nvcpus
    ];
    let mut maps = vec![0u8; nvcpus * maplen];
    // SAFETY: `info` has room for `nvcpus` records and `maps` for `nvcpus` bitmaps of `maplen`
    // bytes, exactly what we tell libvirt; it writes at most that and returns how many it filled.
    let filled = unsafe {
        sys::virDomainGetVcpus(
            dom.as_ptr(),
            info.as_mut_ptr(),
            nvcpus as c_int,
            maps.as_mut_ptr(),
            maplen as c_int,
        )
    };
    if filled < 0 {
        return Err(Error::last_error());
    }
    Ok(info
        .iter()
        .zip(maps.chunks(maplen))
        .take(filled as usize)
        .map(|(vcpu, map)| RawVcpu {
            number: vcpu.number,
            cpu_time_ns: vcpu.cpuTime,
            cpu: vcpu.cpu,
            affinity: cpus_in_map(map, present_cpus),
        })
        .collect())
}

/// `virNodeGetMemoryStats` over all NUMA cells: every (field, KiB) pair the driver reports.
///
/// libvirt wants the exact number of fields, which a first call with no array returns: pass the
/// number learnt before in `fields` (0 when unknown) to save that round trip; it is updated.
pub fn node_memory_stats(conn: &Connect, fields: &mut c_int) -> Result<Vec<(String, u64)>, Error> {
    let cells = sys::VIR_NODE_MEMORY_STATS_ALL_CELLS;
    if *fields <= 0 {
        // SAFETY: with a null array libvirt only writes the number of fields into `fields`.
        let ret = unsafe {
            sys::virNodeGetMemoryStats(conn.as_ptr(), cells, std::ptr::null_mut(), fields, 0)
        };
        if ret < 0 {
            return Err(Error::last_error());
        }
    }
    let empty = sys::virNodeMemoryStats {
        field: [0; sys::VIR_NODE_MEMORY_STATS_FIELD_LENGTH as usize],
        value: 0,
    };
    let mut params = vec![empty; (*fields).max(0) as usize];
    let mut count = params.len() as c_int;
    // SAFETY: `params` has room for `count` records, which is what we pass; libvirt updates
    // `count` to the number it filled, never more.
    let ret = unsafe {
        sys::virNodeGetMemoryStats(conn.as_ptr(), cells, params.as_mut_ptr(), &mut count, 0)
    };
    if ret < 0 {
        // Perhaps the number of fields changed: learn it again next time.
        *fields = 0;
        return Err(Error::last_error());
    }
    Ok(params
        .iter()
        .take(count.max(0) as usize)
        .map(|p| (c_field(&p.field), p.value))
        .collect())
}

/// One typed parameter's value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// Any of libvirt's integer types, widened.
    Int(i128),
    /// A double.
    Float(f64),
    /// A string.
    Text(String),
}

impl Value {
    /// The value as an unsigned integer, when it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Int(i) => u64::try_from(*i).ok(),
            _ => None,
        }
    }
}

/// One domain's record from `virConnectGetAllDomainStats`.
#[derive(Clone, Debug, PartialEq)]
pub struct DomainStats {
    /// The domain's UUID.
    pub uuid: [u8; 16],
    /// The domain's name.
    pub name: String,
    /// The domain's numeric ID (changes when it restarts).
    pub id: u32,
    /// Every statistic, by field name ("vcpu.0.time", "balloon.current", ...).
    pub fields: Vec<(String, Value)>,
}

impl DomainStats {
    /// An unsigned field by name.
    pub fn u64(&self, name: &str) -> Option<u64> {
        self.fields
            .iter()
            .find(|(f, _)| f == name)
            .and_then(|(_, v)| v.as_u64())
    }

    /// vCPU `n`'s run-queue delay (ns), where the record has it.
    pub fn vcpu_delay(&self, n: u32) -> Option<u64> {
        self.u64(&format!("vcpu.{n}.delay"))
    }
}

/// A fixed-size C field name as a string (up to its NUL).
pub(super) fn c_field(field: &[std::os::raw::c_char]) -> String {
    let bytes: Vec<u8> = field
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Decode one typed parameter.
///
/// # Safety
/// `p` must be a typed parameter filled by libvirt: its `type_` says which union member is set,
/// and a string member points to a NUL-terminated string.
pub(super) unsafe fn typed_value(p: &sys::virTypedParameter) -> Option<Value> {
    // SAFETY: each arm reads the union member that `type_` names, as the caller guarantees.
    unsafe {
        Some(match p.type_ as u32 {
            sys::VIR_TYPED_PARAM_INT => Value::Int(p.value.i.into()),
            sys::VIR_TYPED_PARAM_UINT => Value::Int(p.value.ui.into()),
            sys::VIR_TYPED_PARAM_LLONG => Value::Int(p.value.l.into()),
            sys::VIR_TYPED_PARAM_ULLONG => Value::Int(p.value.ul.into()),
            sys::VIR_TYPED_PARAM_DOUBLE => Value::Float(p.value.d),
            sys::VIR_TYPED_PARAM_BOOLEAN => Value::Int((p.value.b != 0).into()),
            sys::VIR_TYPED_PARAM_STRING if !p.value.s.is_null() => Value::Text(
                std::ffi::CStr::from_ptr(p.value.s)
                    .to_string_lossy()
                    .into_owned(),
            ),
            _ => return None,
        })
    }
}

/// `virConnectGetAllDomainStats` for the active domains: the statistics groups in `stats`
/// (`VIR_DOMAIN_STATS_*`) of every one of them, in a single call. With `nowait`, a domain busy in
/// a libvirt job (a hung QEMU monitor, a long dump) does not hold the call up: its record then
/// lacks what needs the job.
pub fn all_domain_stats(
    conn: &Connect,
    stats: u32,
    nowait: bool,
) -> Result<Vec<DomainStats>, Error> {
    let mut records: *mut sys::virDomainStatsRecordPtr = std::ptr::null_mut();
    let mut flags = sys::VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE;
    if nowait {
        flags |= sys::VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT;
    }
    // SAFETY: libvirt allocates a NULL-terminated array of records and hands it to us; we read
    // it and release it, records and domain references included, with
    // virDomainStatsRecordListFree, exactly once.
    let count = unsafe {
        sys::virConnectGetAllDomainStats(
            conn.as_ptr(),
            stats as c_uint,
            &mut records,
            flags as c_uint,
        )
    };
    if count < 0 {
        return Err(Error::last_error());
    }
    // SAFETY: `records` is the list libvirt returned, of `count` records.
    Ok(unsafe { take_records(records, count) })
}

/// `virDomainListGetStats` for every active domain but those in `skip` (by UUID), with the
/// listing it was made from (each active domain's UUID, name and ID): the statistics groups in
/// `stats` of every domain that answers, in one call, while the domains in `skip` (a call on them
/// is stuck) keep out of it. `nowait` as for [`all_domain_stats`].
#[allow(clippy::type_complexity)]
pub fn listed_domain_stats(
    conn: &Connect,
    skip: &[[u8; 16]],
    stats: u32,
    nowait: bool,
) -> Result<(Vec<([u8; 16], String, u32)>, Vec<DomainStats>), Error> {
    let domains = conn.list_all_domains(sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)?;
    let mut listed = Vec::with_capacity(domains.len());
    let mut asked = Vec::with_capacity(domains.len());
    for dom in &domains {
        let (Ok(uuid), Ok(name)) = (dom.uuid(), dom.name()) else {
            continue;
        };
        let uuid = *uuid.as_bytes();
        listed.push((uuid, name, dom.id().unwrap_or(u32::MAX)));
        if !skip.contains(&uuid) {
            asked.push(dom);
        }
    }
    Ok((listed, stats_of(&asked, stats, nowait)?))
}

/// `virDomainListGetStats` for one domain: its statistics groups `stats` (`nowait` as for
/// [`all_domain_stats`]); `None` when libvirt gives no record for it.
pub fn domain_stats(dom: &Domain, stats: u32, nowait: bool) -> Result<Option<DomainStats>, Error> {
    Ok(stats_of(&[dom], stats, nowait)?.into_iter().next())
}

/// `virDomainListGetStats` over `domains`.
fn stats_of(domains: &[&Domain], stats: u32, nowait: bool) -> Result<Vec<DomainStats>, Error> {
    if domains.is_empty() {
        return Ok(Vec::new());
    }
    // SAFETY: the pointers are only handed to libvirt below, while `domains` keeps the references
    // they stand for alive.
    let mut asked: Vec<sys::virDomainPtr> = domains.iter().map(|d| unsafe { d.as_ptr() }).collect();
    asked.push(std::ptr::null_mut());
    let flags = if nowait {
        sys::VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT
    } else {
        0
    };
    let mut records: *mut sys::virDomainStatsRecordPtr = std::ptr::null_mut();
    // SAFETY: `asked` is a NULL-terminated array of live domain pointers; libvirt allocates the
    // records and hands them to us (see take_records).
    let count = unsafe {
        sys::virDomainListGetStats(
            asked.as_mut_ptr(),
            stats as c_uint,
            &mut records,
            flags as c_uint,
        )
    };
    if count < 0 {
        return Err(Error::last_error());
    }
    // SAFETY: as above.
    Ok(unsafe { take_records(records, count) })
}

/// The records of a statistics call, decoded, and the list freed.
///
/// # Safety
/// `records` must be the NULL-terminated list of `count` records that virConnectGetAllDomainStats
/// or virDomainListGetStats returned, not yet freed; it is freed here, exactly once.
unsafe fn take_records(
    records: *mut sys::virDomainStatsRecordPtr,
    count: c_int,
) -> Vec<DomainStats> {
    let mut out = Vec::with_capacity(count as usize);
    for i in 0..count as usize {
        // SAFETY: `records` holds `count` valid record pointers.
        let record = unsafe { &**records.add(i) };
        let mut uuid = [0u8; 16];
        // SAFETY: `record.dom` is a live domain reference owned by the record list; UUID, name and
        // ID are read from the local object (no round trip). The name is copied before the free.
        let (ok, name, id) = unsafe {
            let ok = sys::virDomainGetUUID(record.dom, uuid.as_mut_ptr()) == 0;
            let name_ptr = sys::virDomainGetName(record.dom);
            let name = if name_ptr.is_null() {
                String::new()
            } else {
                std::ffi::CStr::from_ptr(name_ptr)
                    .to_string_lossy()
                    .into_owned()
            };
            (ok, name, sys::virDomainGetID(record.dom))
        };
        if !ok {
            continue;
        }
        let params: &[sys::virTypedParameter] = if record.params.is_null() || record.nparams <= 0 {
            &[]
        } else {
            // SAFETY: the record holds `nparams` typed parameters at `params`.
            unsafe { std::slice::from_raw_parts(record.params, record.nparams as usize) }
        };
        let fields = params
            .iter()
            // SAFETY: every parameter was filled by libvirt.
            .filter_map(|p| Some((c_field(&p.field), unsafe { typed_value(p) }?)))
            .collect();
        out.push(DomainStats {
            uuid,
            name,
            id,
            fields,
        });
    }
    if !records.is_null() {
        // SAFETY: the list came from libvirt and nothing refers to it now.
        unsafe { sys::virDomainStatsRecordListFree(records) };
    }
    out
}

/// Which definition of a domain a call reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Definition {
    /// The running domain.
    Live,
    /// Its persistent configuration.
    Config,
}

/// `virDomainGetVcpuPinInfo`: the affinity of each of the domain's `nvcpus` vCPUs on a host with
/// `present_cpus` pCPUs, in its live state or its persistent configuration.
pub fn vcpu_pin_info(
    dom: &Domain,
    nvcpus: u32,
    present_cpus: u32,
    definition: Definition,
) -> Result<Vec<Vec<u32>>, Error> {
    let flags = match definition {
        Definition::Live => sys::VIR_DOMAIN_AFFECT_LIVE,
        Definition::Config => sys::VIR_DOMAIN_AFFECT_CONFIG,
    };
    if nvcpus == 0 {
        return Ok(Vec::new());
    }
    let maplen = cpu_map_len(present_cpus.max(1));
    let mut maps = vec![0u8; nvcpus as usize * maplen];
    // SAFETY: `maps` has room for `nvcpus` bitmaps of `maplen` bytes, which is what we pass.
    let filled = unsafe {
        sys::virDomainGetVcpuPinInfo(
            dom.as_ptr(),
            nvcpus as c_int,
            maps.as_mut_ptr(),
            maplen as c_int,
            flags as c_uint,
        )
    };
    if filled < 0 {
        return Err(Error::last_error());
    }
    Ok(maps
        .chunks(maplen)
        .take(filled as usize)
        .map(|m| cpus_in_map(m, present_cpus))
        .collect())
}

/// What holds a domain's control interface, as `virDomainGetControlInfo` tells without waiting on
/// it (it needs neither the domain's job nor its QEMU).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Control {
    /// Free, or held for less than the time asked about.
    Free,
    /// A job (ours or another client's: a migration, a dump, a call waiting on QEMU) has held it
    /// for `secs` seconds.
    InJob { secs: f64 },
    /// A call has waited on the QEMU monitor for `secs` seconds.
    Occupied { secs: f64 },
    /// The monitor failed: the domain's QEMU cannot be talked to.
    Broken,
}

/// `virDomainGetControlInfo`: is domain `dom` held longer than `longer_than` (a call needing its
/// job or monitor would wait)?
pub fn control(dom: &Domain, longer_than: Duration) -> Result<Control, Error> {
    let mut info = sys::virDomainControlInfo {
        state: 0,
        details: 0,
        stateTime: 0,
    };
    // SAFETY: `info` is a valid, writable virDomainControlInfo; flags must be 0.
    if unsafe { sys::virDomainGetControlInfo(dom.as_ptr(), &mut info, 0) } < 0 {
        return Err(Error::last_error());
    }
    let secs = info.stateTime as f64 / 1000.0;
    let held = Duration::from_millis(info.stateTime) > longer_than;
    Ok(match info.state as sys::virDomainControlState {
        sys::VIR_DOMAIN_CONTROL_JOB if held => Control::InJob { secs },
        sys::VIR_DOMAIN_CONTROL_OCCUPIED if held => Control::Occupied { secs },
        sys::VIR_DOMAIN_CONTROL_ERROR => Control::Broken,
        _ => Control::Free,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_round_trip() {
        for cpus in [1u32, 7, 8, 9, 64, 130] {
            for cpu in 0..cpus {
                let map = map_of_cpus(&[cpu], cpus);
                assert_eq!(map.len(), cpu_map_len(cpus));
                assert_eq!(cpus_in_map(&map, cpus), vec![cpu]);
            }
        }
        let several = map_of_cpus(&[1, 3, 9], 10);
        assert_eq!(cpus_in_map(&several, 10), vec![1, 3, 9]);
    }

    #[test]
    fn bitmap_decodes_several_bits_and_ignores_bits_past_the_count() {
        // 0b0001_0101 = CPUs 0, 2, 4; byte 1 bit 1 = CPU 9.
        assert_eq!(cpus_in_map(&[0x15, 0x02], 16), vec![0, 2, 4, 9]);
        assert_eq!(cpus_in_map(&[0x15, 0x02], 4), vec![0, 2]);
        assert_eq!(cpus_in_map(&[0x15], 16), vec![0, 2, 4]);
    }
}
