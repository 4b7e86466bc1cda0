//! An in-memory [`Store`] so allocation logic is tested without a disk or
//! locks; it behaves like the file store minus persistence.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::{Allocation, Store, StoreError};

/// Allocations and round-robin positions kept in maps.
#[derive(Debug, Default, Clone)]
pub struct MemStore {
    held: BTreeMap<IpAddr, (String, String)>,
    last: BTreeMap<usize, IpAddr>,
}

impl Store for MemStore {
    fn is_allocated(&self, ip: IpAddr) -> Result<bool, StoreError> {
        Ok(self.held.contains_key(&ip))
    }

    fn reserve(&mut self, ip: IpAddr, id: &str, ifname: &str) -> Result<bool, StoreError> {
        if self.held.contains_key(&ip) {
            return Ok(false);
        }
        self.held.insert(ip, (id.to_owned(), ifname.to_owned()));
        Ok(true)
    }

    fn last_reserved(&self, range_set: usize) -> Result<Option<IpAddr>, StoreError> {
        Ok(self.last.get(&range_set).copied())
    }

    fn set_last_reserved(&mut self, range_set: usize, ip: IpAddr) -> Result<(), StoreError> {
        self.last.insert(range_set, ip);
        Ok(())
    }

    fn release_by_id(&mut self, id: &str, ifname: &str) -> Result<Vec<IpAddr>, StoreError> {
        let freed: Vec<IpAddr> = self
            .held
            .iter()
            .filter(|(_, (i, f))| i == id && f == ifname)
            .map(|(ip, _)| *ip)
            .collect();
        for ip in &freed {
            self.held.remove(ip);
        }
        Ok(freed)
    }

    fn allocations(&self) -> Result<Vec<Allocation>, StoreError> {
        Ok(self
            .held
            .iter()
            .map(|(ip, (id, ifname))| Allocation {
                ip: *ip,
                container_id: id.clone(),
                ifname: ifname.clone(),
            })
            .collect())
    }
}
