//! Durable named subscriptions and groups: the backend keeps each named subscription's
//! acknowledged position per flow partition, and processes subscribing under one group name
//! share the partitions through fenced leases. [`store`] is the contract with the backends.

pub(crate) mod store;
