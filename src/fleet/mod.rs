//! Several replicas as one proxy, on Redis (`[cluster]`): for now, one channel budget
//! for the fleet.
//!
//! The OAuth client's channels are counted at Genesys across every token and every
//! process, and the 21st evicts the oldest. Each replica's pool keeps its own budget;
//! with `[cluster]`, a channel task also takes a fleet lease ([`leases::FleetLeases`])
//! before it mints and creates its channel, and gives it back only once the channel is
//! gone upstream.
//!
//! Keys, all under `<key_prefix>:` (see [`store::Keys`]):
//!
//! | key | type | what |
//! |---|---|---|
//! | `leases` | sorted set | `<replica>/<channel>` → when the lease lapses (ms, Redis' clock): the build's deadline, then the channel's token expiry |
//! | `ledger` | string | when this Redis started keeping the leases (ms); its absence means Redis lost them |
//!
//! Leases lapse by themselves: a replica that dies leaves its channels alive at
//! Genesys until their tokens expire, and its leases until the same moment.

pub mod leases;
pub mod store;
