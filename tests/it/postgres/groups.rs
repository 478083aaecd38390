//! The durable-group store on Postgres: the promises every backend's store keeps
//! ([`crate::groups::group_store_tests`]).

use super::contract_backend;

crate::groups::group_store_tests!();
