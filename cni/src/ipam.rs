//! IP allocation with host-local's semantics, pure over a [`Store`].
//!
//! The decision (which address next) lives here and is tested against the
//! in-memory [`fake::MemStore`]; persistence and locking live in the store
//! ([`crate::store::FileStore`] on disk). Callers hold the store's lock for the
//! whole of [`allocate`] so two ADDs never pick the same address.
//!
//! One deliberate difference from host-local: a repeated ADD for the same
//! (container ID, ifname) returns the addresses it already holds instead of
//! failing, so a runtime retrying after a timeout does not leak or error.

pub mod fake;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;

use crate::error::CniError;
use crate::netconf::{first_usable, from_u128, last_usable, to_u128, Range, RangeSet};

/// A failure of the allocation store; always an I/O-level problem, so it
/// maps to CNI code 5.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file or directory operation failed.
    #[error("ipam store {path}: {source}")]
    Io {
        /// The path that failed.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Taking the store's lock failed.
    #[error("ipam store lock {path}: {source}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The errno from flock.
        #[source]
        source: nix::Error,
    },
}

impl From<StoreError> for CniError {
    fn from(err: StoreError) -> Self {
        CniError::io(err.to_string())
    }
}

/// One address held by one container interface.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Allocation {
    /// The address.
    pub ip: IpAddr,
    /// Container ID that holds it.
    pub container_id: String,
    /// Interface name inside the container.
    pub ifname: String,
}

/// Where allocations live. Small on purpose: everything that decides is in
/// this module, the store only remembers.
pub trait Store {
    /// Whether anyone holds `ip`.
    fn is_allocated(&self, ip: IpAddr) -> Result<bool, StoreError>;
    /// Records `ip` for (`id`, `ifname`); `false` if it was already taken.
    fn reserve(&mut self, ip: IpAddr, id: &str, ifname: &str) -> Result<bool, StoreError>;
    /// The address most recently handed out from range set `range_set`.
    fn last_reserved(&self, range_set: usize) -> Result<Option<IpAddr>, StoreError>;
    /// Remembers where round-robin should continue for `range_set`.
    fn set_last_reserved(&mut self, range_set: usize, ip: IpAddr) -> Result<(), StoreError>;
    /// Frees every address held by (`id`, `ifname`); returns them.
    fn release_by_id(&mut self, id: &str, ifname: &str) -> Result<Vec<IpAddr>, StoreError>;
    /// Everything currently allocated.
    fn allocations(&self) -> Result<Vec<Allocation>, StoreError>;
}

/// An address given to a container, with what the result JSON needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assigned {
    /// Address with the subnet's prefix length (e.g. `10.22.0.5/16`).
    pub address: IpNet,
    /// Gateway of the range it came from.
    pub gateway: Option<IpAddr>,
    /// Index of the range set it came from.
    pub range_set: usize,
}

/// Gives (`id`, `ifname`) one address from each range set.
///
/// Requested addresses (`runtimeConfig.ips`) are honoured if inside a range,
/// assignable and free, else the call fails. Other sets get the next free
/// address round-robin after the last one handed out. A repeated call returns
/// the addresses already held. If the call reserved anything and then fails,
/// every address of (`id`, `ifname`) is released, as host-local does, so a
/// failed ADD leaves nothing behind.
pub fn allocate<S: Store>(
    store: &mut S,
    range_sets: &[RangeSet],
    id: &str,
    ifname: &str,
    requested: &[IpAddr],
) -> Result<Vec<Assigned>, CniError> {
    let wanted = requested_per_set(range_sets, requested)?;
    let held: Vec<IpAddr> = store
        .allocations()?
        .into_iter()
        .filter(|a| a.container_id == id && a.ifname == ifname)
        .map(|a| a.ip)
        .collect();
    let mut out = Vec::with_capacity(range_sets.len());
    let mut reserved_new = false;
    for (index, set) in range_sets.iter().enumerate() {
        let existing = held.iter().copied().find(|ip| set.range_for(*ip).is_some());
        let result = match existing {
            Some(ip) => reuse(set, index, ip, wanted.get(&index).copied()),
            None => {
                reserved_new = true;
                match wanted.get(&index) {
                    Some(ip) => assign_requested(store, set, index, *ip, id, ifname),
                    None => assign_next(store, set, index, id, ifname),
                }
            }
        };
        match result {
            Ok(assigned) => out.push(assigned),
            Err(err) => return Err(undo(store, reserved_new, id, ifname, err)),
        }
    }
    Ok(out)
}

/// Indexes of the range sets with no address left to give (STATUS reports
/// the plugin not ready then).
pub fn exhausted<S: Store>(store: &S, range_sets: &[RangeSet]) -> Result<Vec<usize>, CniError> {
    let taken: Vec<IpAddr> = store.allocations()?.into_iter().map(|a| a.ip).collect();
    Ok(range_sets
        .iter()
        .enumerate()
        .filter(|(_, set)| !set.ranges.iter().any(|r| has_room(r, &taken)))
        .map(|(index, _)| index)
        .collect())
}

/// Counting, not scanning: a /64 range has room unless it is absurdly full.
fn has_room(range: &Range, taken: &[IpAddr]) -> bool {
    let first = to_u128(first_usable(range.subnet)).max(to_u128(range.range_start));
    let last = to_u128(last_usable(range.subnet)).min(to_u128(range.range_end));
    if last < first {
        return false;
    }
    let size = last - first + 1;
    let in_span = |ip: IpAddr| {
        ip.is_ipv4() == range.range_start.is_ipv4() && (first..=last).contains(&to_u128(ip))
    };
    let gateway = u128::from(range.gateway.is_some_and(in_span));
    let used = taken.iter().filter(|ip| in_span(**ip)).count() as u128;
    used + gateway < size
}

/// Frees every address of (`id`, `ifname`); freeing nothing is not an error,
/// because DEL must be idempotent.
pub fn release<S: Store>(store: &mut S, id: &str, ifname: &str) -> Result<Vec<IpAddr>, CniError> {
    Ok(store.release_by_id(id, ifname)?)
}

/// Keeps the original error; a failed rollback is appended so it is not lost.
fn undo<S: Store>(
    store: &mut S,
    reserved_new: bool,
    id: &str,
    ifname: &str,
    err: CniError,
) -> CniError {
    if !reserved_new {
        return err;
    }
    match store.release_by_id(id, ifname) {
        Ok(_) => err,
        Err(rollback) => CniError::new(
            err.code,
            err.msg,
            format!(
                "{}; releasing partial allocation also failed: {rollback}",
                err.details
            ),
        ),
    }
}

/// Maps each requested address to the range set that holds it.
fn requested_per_set(
    range_sets: &[RangeSet],
    requested: &[IpAddr],
) -> Result<BTreeMap<usize, IpAddr>, CniError> {
    let mut wanted = BTreeMap::new();
    for ip in requested {
        let index = range_sets
            .iter()
            .position(|s| s.range_for(*ip).is_some())
            .ok_or_else(|| {
                CniError::requested_ip_unavailable(format!(
                    "requested ip {ip} is not in any configured range"
                ))
            })?;
        if let Some(other) = wanted.insert(index, *ip) {
            return Err(CniError::requested_ip_unavailable(format!(
                "requested ips {other} and {ip} both fall in range set {}",
                range_sets[index]
            )));
        }
    }
    Ok(wanted)
}

fn reuse(
    set: &RangeSet,
    index: usize,
    ip: IpAddr,
    wanted: Option<IpAddr>,
) -> Result<Assigned, CniError> {
    if let Some(want) = wanted.filter(|w| *w != ip) {
        return Err(CniError::requested_ip_unavailable(format!(
            "requested ip {want} but this container interface already holds {ip} in range set {set}"
        )));
    }
    assigned(set, index, ip)
}

fn assign_requested<S: Store>(
    store: &mut S,
    set: &RangeSet,
    index: usize,
    ip: IpAddr,
    id: &str,
    ifname: &str,
) -> Result<Assigned, CniError> {
    let assignable = set.range_for(ip).is_some_and(|r| r.can_assign(ip));
    if !assignable {
        return Err(CniError::requested_ip_unavailable(format!(
            "requested ip {ip} is a gateway, network or broadcast address of range set {set}"
        )));
    }
    if !store.reserve(ip, id, ifname)? {
        return Err(CniError::requested_ip_unavailable(format!(
            "requested ip {ip} is already allocated in range set {set}"
        )));
    }
    store.set_last_reserved(index, ip)?;
    assigned(set, index, ip)
}

fn assign_next<S: Store>(
    store: &mut S,
    set: &RangeSet,
    index: usize,
    id: &str,
    ifname: &str,
) -> Result<Assigned, CniError> {
    let last = store.last_reserved(index)?;
    for ip in Candidates::after(set, last) {
        let free =
            set.range_for(ip).is_some_and(|r| r.can_assign(ip)) && !store.is_allocated(ip)?;
        if free && store.reserve(ip, id, ifname)? {
            store.set_last_reserved(index, ip)?;
            return assigned(set, index, ip);
        }
    }
    Err(CniError::ipam_exhausted(&set.to_string()))
}

fn assigned(set: &RangeSet, index: usize, ip: IpAddr) -> Result<Assigned, CniError> {
    let range = set
        .range_for(ip)
        .ok_or_else(|| CniError::io(format!("address {ip} is not in range set {set}")))?;
    let address = IpNet::new(ip, range.subnet.prefix_len()).map_err(|e| {
        CniError::invalid_config(format!("address {ip}/{}: {e}", range.subnet.prefix_len()))
    })?;
    Ok(Assigned {
        address,
        gateway: range.gateway,
        range_set: index,
    })
}

/// Every address of a range set once, starting just after `last` (or at the
/// first range's start when `last` is not in the set) and wrapping around:
/// host-local's round-robin, which avoids reusing a just-freed address.
struct Candidates<'a> {
    ranges: &'a [Range],
    start: (usize, u128),
    next: Option<(usize, u128)>,
}

impl<'a> Candidates<'a> {
    fn after(set: &'a RangeSet, last: Option<IpAddr>) -> Self {
        let ranges = set.ranges.as_slice();
        let first = (0, ranges.first().map_or(0, |r| to_u128(r.range_start)));
        let start = last
            .and_then(|ip| {
                ranges
                    .iter()
                    .position(|r| r.contains(ip))
                    .map(|i| (i, to_u128(ip)))
            })
            .map_or(first, |pos| advance(ranges, pos));
        Self {
            ranges,
            start,
            next: (!ranges.is_empty()).then_some(start),
        }
    }
}

impl Iterator for Candidates<'_> {
    type Item = IpAddr;

    fn next(&mut self) -> Option<IpAddr> {
        let pos = self.next?;
        let after = advance(self.ranges, pos);
        self.next = (after != self.start).then_some(after);
        from_u128(pos.1, self.ranges[pos.0].range_start)
    }
}

/// The position after `(range, value)`, moving to the next range (and
/// wrapping) at a range's end.
fn advance(ranges: &[Range], (range, value): (usize, u128)) -> (usize, u128) {
    if value < to_u128(ranges[range].range_end) {
        return (range, value + 1);
    }
    let next = (range + 1) % ranges.len();
    (next, to_u128(ranges[next].range_start))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::fake::MemStore;
    use super::*;
    use crate::error::code;
    use crate::netconf;
    use serde_json::json;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn sets(ranges: serde_json::Value) -> Vec<RangeSet> {
        let conf = json!({
            "cniVersion": "1.1.0", "name": "t", "type": "bosun-cni",
            "ipam": {"ranges": ranges}
        });
        netconf::parse(conf.to_string().as_bytes())
            .unwrap()
            .range_sets()
            .to_vec()
    }

    fn one(store: &mut MemStore, sets: &[RangeSet], id: &str) -> Result<IpAddr, CniError> {
        allocate(store, sets, id, "eth0", &[]).map(|a| a[0].address.addr())
    }

    #[test]
    fn first_allocation_skips_network_and_gateway() {
        let sets = sets(json!([[{"subnet": "10.0.0.0/29"}]]));
        let mut store = MemStore::default();
        let got = allocate(&mut store, &sets, "c1", "eth0", &[]).unwrap();
        assert_eq!(
            got,
            vec![Assigned {
                address: "10.0.0.2/29".parse().unwrap(),
                gateway: Some(ip("10.0.0.1")),
                range_set: 0,
            }]
        );
        assert_eq!(store.last_reserved(0).unwrap(), Some(ip("10.0.0.2")));
    }

    #[test]
    fn exhausted_names_full_range_sets_only() {
        let sets = sets(json!([[{"subnet": "10.0.0.0/30"}], [{"subnet": "fd00::/64"}]]));
        let mut store = MemStore::default();
        assert!(exhausted(&store, &sets).unwrap().is_empty());
        // A /30 has .1 (gateway) and .2 usable: one container fills it.
        allocate(&mut store, &sets, "a", "eth0", &[]).unwrap();
        assert_eq!(exhausted(&store, &sets).unwrap(), vec![0]);
        release(&mut store, "a", "eth0").unwrap();
        assert!(exhausted(&store, &sets).unwrap().is_empty());
    }

    #[test]
    fn round_robin_does_not_reuse_a_freed_address_until_wrap() {
        let sets = sets(json!([[{"subnet": "10.0.0.0/29"}]]));
        let mut store = MemStore::default();
        let got: Vec<IpAddr> = ["a", "b", "c"]
            .iter()
            .map(|id| one(&mut store, &sets, id).unwrap())
            .collect();
        assert_eq!(got, vec![ip("10.0.0.2"), ip("10.0.0.3"), ip("10.0.0.4")]);
        release(&mut store, "a", "eth0").unwrap();
        assert_eq!(one(&mut store, &sets, "d").unwrap(), ip("10.0.0.5"));
        assert_eq!(one(&mut store, &sets, "e").unwrap(), ip("10.0.0.6"));
        // Wraps past broadcast (.7), network (.0) and gateway (.1) to the freed .2.
        assert_eq!(one(&mut store, &sets, "f").unwrap(), ip("10.0.0.2"));
        let err = one(&mut store, &sets, "g").unwrap_err();
        assert_eq!(err.code, code::IPAM_EXHAUSTED);
        assert_eq!(
            err.details,
            "no IP addresses available in range set 10.0.0.1-10.0.0.6"
        );
    }

    #[test]
    fn explicit_gateway_in_the_middle_is_skipped() {
        let sets = sets(json!([[{"subnet": "10.0.0.0/29", "gateway": "10.0.0.3"}]]));
        let mut store = MemStore::default();
        let got: Vec<IpAddr> = ["a", "b", "c"]
            .iter()
            .map(|id| one(&mut store, &sets, id).unwrap())
            .collect();
        assert_eq!(got, vec![ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.0.4")]);
    }

    #[test]
    fn slash_30_has_one_address_after_the_gateway() {
        let sets = sets(json!([[{"subnet": "192.168.5.0/30"}]]));
        let mut store = MemStore::default();
        assert_eq!(one(&mut store, &sets, "a").unwrap(), ip("192.168.5.2"));
        assert_eq!(
            one(&mut store, &sets, "b").unwrap_err().code,
            code::IPAM_EXHAUSTED
        );
    }

    #[test]
    fn slash_31_uses_both_addresses_minus_gateway() {
        let sets = sets(json!([[{"subnet": "10.1.1.0/31"}]]));
        let mut store = MemStore::default();
        assert_eq!(one(&mut store, &sets, "a").unwrap(), ip("10.1.1.1"));
        assert_eq!(
            one(&mut store, &sets, "b").unwrap_err().code,
            code::IPAM_EXHAUSTED
        );
    }

    #[test]
    fn slash_32_hands_out_its_single_address() {
        let sets = sets(json!([[{"subnet": "10.1.1.9/32"}]]));
        assert_eq!(sets[0].ranges[0].gateway, None);
        let mut store = MemStore::default();
        let got = allocate(&mut store, &sets, "a", "eth0", &[]).unwrap();
        assert_eq!(got[0].address.to_string(), "10.1.1.9/32");
        assert_eq!(
            one(&mut store, &sets, "b").unwrap_err().code,
            code::IPAM_EXHAUSTED
        );
    }

    #[test]
    fn ipv6_skips_subnet_router_anycast_and_gateway() {
        let sets = sets(json!([[{"subnet": "fd00:10::/64"}]]));
        let mut store = MemStore::default();
        let got = allocate(&mut store, &sets, "a", "eth0", &[]).unwrap();
        assert_eq!(got[0].address.to_string(), "fd00:10::2/64");
        assert_eq!(got[0].gateway, Some(ip("fd00:10::1")));
    }

    #[test]
    fn ipv6_small_subnet_uses_last_address_and_exhausts() {
        let sets = sets(json!([[{"subnet": "fd00::/126"}]]));
        let mut store = MemStore::default();
        let got: Vec<IpAddr> = ["a", "b"]
            .iter()
            .map(|id| one(&mut store, &sets, id).unwrap())
            .collect();
        assert_eq!(got, vec![ip("fd00::2"), ip("fd00::3")]);
        assert_eq!(
            one(&mut store, &sets, "c").unwrap_err().code,
            code::IPAM_EXHAUSTED
        );
    }

    #[test]
    fn dual_stack_gets_one_address_per_range_set() {
        let sets = sets(json!([[{"subnet": "10.2.0.0/24"}], [{"subnet": "fd00:2::/64"}]]));
        let mut store = MemStore::default();
        let got = allocate(&mut store, &sets, "a", "eth0", &[]).unwrap();
        let addrs: Vec<String> = got.iter().map(|a| a.address.to_string()).collect();
        assert_eq!(addrs, vec!["10.2.0.2/24", "fd00:2::2/64"]);
        assert_eq!((got[0].range_set, got[1].range_set), (0, 1));
        assert_eq!(store.last_reserved(1).unwrap(), Some(ip("fd00:2::2")));
    }

    #[test]
    fn repeated_add_is_idempotent_per_interface() {
        let sets = sets(json!([[{"subnet": "10.2.0.0/24"}], [{"subnet": "fd00:2::/64"}]]));
        let mut store = MemStore::default();
        let first = allocate(&mut store, &sets, "a", "eth0", &[]).unwrap();
        let again = allocate(&mut store, &sets, "a", "eth0", &[]).unwrap();
        assert_eq!(first, again);
        assert_eq!(store.allocations().unwrap().len(), 2);
        let other_if = allocate(&mut store, &sets, "a", "net1", &[]).unwrap();
        assert_ne!(first[0].address, other_if[0].address);
    }

    #[test]
    fn multi_range_set_moves_on_to_the_next_range() {
        let sets = sets(json!([[
            {"subnet": "10.3.0.0/24", "rangeStart": "10.3.0.10", "rangeEnd": "10.3.0.11"},
            {"subnet": "10.4.0.0/24", "rangeStart": "10.4.0.20", "rangeEnd": "10.4.0.20"}
        ]]));
        let mut store = MemStore::default();
        let got: Vec<IpAddr> = ["a", "b", "c"]
            .iter()
            .map(|id| one(&mut store, &sets, id).unwrap())
            .collect();
        assert_eq!(got, vec![ip("10.3.0.10"), ip("10.3.0.11"), ip("10.4.0.20")]);
        let err = one(&mut store, &sets, "d").unwrap_err();
        assert_eq!(
            err.details,
            "no IP addresses available in range set 10.3.0.10-10.3.0.11,10.4.0.20-10.4.0.20"
        );
    }

    #[test]
    fn stale_last_reserved_outside_ranges_restarts_at_range_start() {
        let sets = sets(json!([[{"subnet": "10.5.0.0/24", "rangeStart": "10.5.0.50"}]]));
        let mut store = MemStore::default();
        store.set_last_reserved(0, ip("192.0.2.1")).unwrap();
        assert_eq!(one(&mut store, &sets, "a").unwrap(), ip("10.5.0.50"));
    }

    #[test]
    fn requested_ip_is_honoured_and_other_sets_round_robin() {
        let sets = sets(json!([[{"subnet": "10.2.0.0/24"}], [{"subnet": "fd00:2::/64"}]]));
        let mut store = MemStore::default();
        let got = allocate(&mut store, &sets, "a", "eth0", &[ip("10.2.0.77")]).unwrap();
        assert_eq!(got[0].address.to_string(), "10.2.0.77/24");
        assert_eq!(got[1].address.to_string(), "fd00:2::2/64");
        // Round-robin continues after the requested address.
        assert_eq!(one(&mut store, &sets, "b").unwrap(), ip("10.2.0.78"));
    }

    #[test]
    fn requested_ip_errors_name_the_address() {
        let sets = sets(json!([[{"subnet": "10.2.0.0/24"}]]));
        let mut store = MemStore::default();
        allocate(&mut store, &sets, "a", "eth0", &[ip("10.2.0.9")]).unwrap();
        let cases = [
            (
                ip("10.9.0.1"),
                "requested ip 10.9.0.1 is not in any configured range",
            ),
            (ip("10.2.0.1"), "requested ip 10.2.0.1 is a gateway"),
            (ip("10.2.0.9"), "requested ip 10.2.0.9 is already allocated"),
        ];
        for (want, needle) in cases {
            let err = allocate(&mut store, &sets, "b", "eth0", &[want]).unwrap_err();
            assert_eq!(err.code, code::IPAM_REQUESTED_IP_UNAVAILABLE);
            assert!(err.details.starts_with(needle), "{err}");
        }
        assert_eq!(store.allocations().unwrap().len(), 1);
    }

    #[test]
    fn failure_in_a_later_set_releases_earlier_reservations() {
        let sets = sets(json!([[{"subnet": "10.2.0.0/24"}], [{"subnet": "10.7.0.0/30"}]]));
        let mut store = MemStore::default();
        allocate(&mut store, &sets, "a", "eth0", &[]).unwrap();
        let err = allocate(&mut store, &sets, "b", "eth0", &[]).unwrap_err();
        assert_eq!(err.code, code::IPAM_EXHAUSTED);
        let holders: Vec<String> = store
            .allocations()
            .unwrap()
            .into_iter()
            .map(|a| a.container_id)
            .collect();
        assert_eq!(holders, vec!["a", "a"]);
    }

    #[test]
    fn release_is_idempotent() {
        let sets = sets(json!([[{"subnet": "10.2.0.0/24"}]]));
        let mut store = MemStore::default();
        let ip = one(&mut store, &sets, "a").unwrap();
        assert_eq!(release(&mut store, "a", "eth0").unwrap(), vec![ip]);
        assert_eq!(
            release(&mut store, "a", "eth0").unwrap(),
            Vec::<IpAddr>::new()
        );
        assert!(!store.is_allocated(ip).unwrap());
    }
}
