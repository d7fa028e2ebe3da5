//! The upstream side: Genesys Cloud calls (`genesys`), the pool of pinned channels
//! within the budget (`pool`), and the task that drives one channel through its
//! life, handovers included (`channel`).

pub mod channel;
pub mod genesys;
pub mod pool;
