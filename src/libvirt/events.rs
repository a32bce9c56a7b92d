//! vCPU pin changes and device hot-plugs as libvirt announces them, so neither need be polled.
//!
//! Bulk statistics carry no pins. Rather than re-reading every domain's pins now and then (one
//! round trip per domain), the libvirt layer keeps the pins it read once and applies the tunable
//! events (`VIR_DOMAIN_EVENT_ID_TUNABLE`, field `cputune.vcpupinN`) that the QEMU driver emits for
//! every pin change, whoever made it. Events need libvirt's default event loop, registered before
//! any connection is opened and run on a thread of its own.
//!
//! Like `raw.rs`, this file owns its `unsafe` blocks: the callback only copies what it is given
//! into owned values behind a mutex.

use std::os::raw::{c_int, c_void};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use virt::connect::Connect;
use virt::error::Error;
use virt::sys;

use super::raw::{Value, c_field, typed_value};

/// A pin change libvirt announced: vCPU `vcpu` of the domain with UUID `uuid` may now run on
/// `cpus` (`None` when the announced CPU list could not be read: the pins must be re-read).
#[derive(Clone, Debug, PartialEq)]
pub struct PinChange {
    /// The domain's UUID.
    pub uuid: [u8; 16],
    /// The vCPU.
    pub vcpu: u32,
    /// Its new affinity, as pCPU numbers.
    pub cpus: Option<Vec<u32>>,
}

/// Start libvirt's default event loop on a thread, once per process. Must run before the
/// connection whose events are wanted is opened. False when libvirt refused it (then no events
/// are delivered and pins are polled instead).
pub fn start_event_loop() -> bool {
    static STARTED: OnceLock<bool> = OnceLock::new();
    *STARTED.get_or_init(|| {
        // SAFETY: takes no arguments; called once per process, before any connection is opened.
        if unsafe { sys::virEventRegisterDefaultImpl() } < 0 {
            return false;
        }
        std::thread::Builder::new()
            .name("libvirt-events".into())
            .spawn(|| {
                loop {
                    // SAFETY: runs one iteration of the default loop registered above; this thread
                    // is the only one that runs it.
                    if unsafe { sys::virEventRunDefaultImpl() } < 0 {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            })
            .is_ok()
    })
}

/// Pin changes delivered by the event loop, waiting to be applied.
type Queue = Mutex<Vec<PinChange>>;

/// A registration for the pin changes of every domain on one connection. Deregistered on drop.
pub struct PinWatch {
    conn: Connect,
    callback_id: c_int,
    queue: Arc<Queue>,
}

impl PinWatch {
    /// Register for tunable events on `conn`.
    pub fn register(conn: &Connect) -> Result<Self, Error> {
        let queue: Arc<Queue> = Arc::default();
        let opaque = Arc::into_raw(Arc::clone(&queue)) as *mut c_void;
        // SAFETY: libvirt calls a tunable-event callback with the tunable signature; the generic
        // type is what the registration takes (the C API's VIR_DOMAIN_EVENT_CALLBACK cast).
        let callback = unsafe {
            std::mem::transmute::<
                unsafe extern "C" fn(
                    sys::virConnectPtr,
                    sys::virDomainPtr,
                    sys::virTypedParameterPtr,
                    c_int,
                    *mut c_void,
                ),
                unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void),
            >(on_tunable)
        };
        // SAFETY: `opaque` is a strong reference to the queue that libvirt hands back to
        // `on_tunable` and releases, exactly once, through `release_queue`.
        let id = unsafe {
            sys::virConnectDomainEventRegisterAny(
                conn.as_ptr(),
                std::ptr::null_mut(),
                sys::VIR_DOMAIN_EVENT_ID_TUNABLE as c_int,
                Some(callback),
                opaque,
                Some(release_queue),
            )
        };
        if id < 0 {
            // SAFETY: registration failed, so libvirt did not keep `opaque`: take it back.
            unsafe { release_queue(opaque) };
            return Err(Error::last_error());
        }
        Ok(Self {
            conn: conn.clone(),
            callback_id: id,
            queue,
        })
    }

    /// The pin changes announced since the last call, oldest first.
    pub fn take(&self) -> Vec<PinChange> {
        self.queue
            .lock()
            .map(|mut q| std::mem::take(&mut *q))
            .unwrap_or_default()
    }
}

impl Drop for PinWatch {
    fn drop(&mut self) {
        // SAFETY: `callback_id` was registered on this connection, which `self.conn` keeps open.
        // A connection that died has dropped its callbacks already; the error is of no use then.
        unsafe { sys::virConnectDomainEventDeregisterAny(self.conn.as_ptr(), self.callback_id) };
    }
}

/// The tunable-event callback: queue every `cputune.vcpupinN` field.
///
/// # Safety
/// Called by libvirt with a live domain, `nparams` typed parameters at `params`, and the
/// `opaque` given at registration.
unsafe extern "C" fn on_tunable(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    params: sys::virTypedParameterPtr,
    nparams: c_int,
    opaque: *mut c_void,
) {
    let mut uuid = [0u8; 16];
    // SAFETY: `dom` is live for the call; the UUID is read from the local object.
    if unsafe { sys::virDomainGetUUID(dom, uuid.as_mut_ptr()) } != 0 {
        return;
    }
    let params: &[sys::virTypedParameter] = if params.is_null() || nparams <= 0 {
        &[]
    } else {
        // SAFETY: libvirt passes `nparams` parameters at `params`.
        unsafe { std::slice::from_raw_parts(params, nparams as usize) }
    };
    let changes: Vec<PinChange> = params
        .iter()
        .filter_map(|p| {
            let vcpu = vcpu_of_pin_field(&c_field(&p.field))?;
            // SAFETY: every parameter was filled by libvirt.
            let cpus = match unsafe { typed_value(p) } {
                Some(Value::Text(list)) => crate::cpuset::parse(&list),
                _ => None,
            };
            Some(PinChange { uuid, vcpu, cpus })
        })
        .collect();
    if changes.is_empty() {
        return;
    }
    // SAFETY: `opaque` is the queue reference taken at registration, alive until
    // `release_queue`, which libvirt calls only after the last callback.
    let queue = unsafe { &*(opaque as *const Queue) };
    if let Ok(mut q) = queue.lock() {
        q.extend(changes);
    }
}

/// Domains (by UUID) whose devices were added or removed, waiting to be read again.
type DeviceQueue = Mutex<Vec<[u8; 16]>>;

/// A registration for device hot-plugs (`VIR_DOMAIN_EVENT_ID_DEVICE_ADDED` and `_REMOVED`) of
/// every domain on one connection: a hot-plugged VFIO or vDPA device pins a guest's memory, so
/// what the domain's XML says of its memory must be read again. Deregistered on drop.
pub struct DeviceWatch {
    conn: Connect,
    callback_ids: Vec<c_int>,
    queue: Arc<DeviceQueue>,
}

impl DeviceWatch {
    /// Register for device-added and device-removed events on `conn`.
    pub fn register(conn: &Connect) -> Result<Self, Error> {
        let mut watch = Self {
            conn: conn.clone(),
            callback_ids: Vec::new(),
            queue: Arc::default(),
        };
        for event in [
            sys::VIR_DOMAIN_EVENT_ID_DEVICE_ADDED,
            sys::VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED,
        ] {
            let opaque = Arc::into_raw(Arc::clone(&watch.queue)) as *mut c_void;
            // SAFETY: libvirt calls device-added and device-removed callbacks with this
            // signature; the generic type is what the registration takes.
            let callback = unsafe {
                std::mem::transmute::<
                    unsafe extern "C" fn(
                        sys::virConnectPtr,
                        sys::virDomainPtr,
                        *const std::os::raw::c_char,
                        *mut c_void,
                    ),
                    unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void),
                >(on_device)
            };
            // SAFETY: `opaque` is a strong reference to the queue that libvirt hands back to
            // `on_device` and releases, exactly once, through `release_device_queue`.
            let id = unsafe {
                sys::virConnectDomainEventRegisterAny(
                    conn.as_ptr(),
                    std::ptr::null_mut(),
                    event as c_int,
                    Some(callback),
                    opaque,
                    Some(release_device_queue),
                )
            };
            if id < 0 {
                // SAFETY: registration failed, so libvirt did not keep `opaque`: take it back.
                unsafe { release_device_queue(opaque) };
                // Dropping `watch` deregisters what was registered.
                return Err(Error::last_error());
            }
            watch.callback_ids.push(id);
        }
        Ok(watch)
    }

    /// The domains whose devices changed since the last call, each once.
    pub fn take(&self) -> Vec<[u8; 16]> {
        let mut uuids = self
            .queue
            .lock()
            .map(|mut q| std::mem::take(&mut *q))
            .unwrap_or_default();
        uuids.sort_unstable();
        uuids.dedup();
        uuids
    }
}

impl Drop for DeviceWatch {
    fn drop(&mut self) {
        for &id in &self.callback_ids {
            // SAFETY: as for `PinWatch`: registered on this connection, kept open by `self.conn`.
            unsafe { sys::virConnectDomainEventDeregisterAny(self.conn.as_ptr(), id) };
        }
    }
}

/// The device-added and device-removed callback: queue the domain's UUID.
///
/// # Safety
/// Called by libvirt with a live domain and the `opaque` given at registration.
unsafe extern "C" fn on_device(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    _alias: *const std::os::raw::c_char,
    opaque: *mut c_void,
) {
    let mut uuid = [0u8; 16];
    // SAFETY: `dom` is live for the call; the UUID is read from the local object.
    if unsafe { sys::virDomainGetUUID(dom, uuid.as_mut_ptr()) } != 0 {
        return;
    }
    // SAFETY: `opaque` is the queue reference taken at registration, alive until
    // `release_device_queue`, which libvirt calls only after the last callback.
    let queue = unsafe { &*(opaque as *const DeviceQueue) };
    if let Ok(mut q) = queue.lock() {
        q.push(uuid);
    }
}

/// Release a device queue reference handed to libvirt at registration.
///
/// # Safety
/// `opaque` must come from `Arc::into_raw` on a device queue, and be released once.
unsafe extern "C" fn release_device_queue(opaque: *mut c_void) {
    // SAFETY: as the caller guarantees.
    drop(unsafe { Arc::from_raw(opaque as *const DeviceQueue) });
}

/// Release the queue reference handed to libvirt at registration.
///
/// # Safety
/// `opaque` must come from `Arc::into_raw` on a queue, and be released once.
unsafe extern "C" fn release_queue(opaque: *mut c_void) {
    // SAFETY: as the caller guarantees.
    drop(unsafe { Arc::from_raw(opaque as *const Queue) });
}

/// The vCPU number of a tunable field naming a vCPU pin (`cputune.vcpupin3` → 3).
fn vcpu_of_pin_field(field: &str) -> Option<u32> {
    field.strip_prefix("cputune.vcpupin")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_vcpu_pin_fields_name_a_vcpu() {
        assert_eq!(vcpu_of_pin_field("cputune.vcpupin0"), Some(0));
        assert_eq!(vcpu_of_pin_field("cputune.vcpupin17"), Some(17));
        assert_eq!(vcpu_of_pin_field("cputune.emulatorpin"), None);
        assert_eq!(vcpu_of_pin_field("cputune.iothreadpin1"), None);
        assert_eq!(vcpu_of_pin_field("cputune.vcpu_period"), None);
    }
}
