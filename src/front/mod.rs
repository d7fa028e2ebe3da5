//! The front door's decisions, as pure functions apart from any I/O: which browser
//! origins and `Host` names are admitted and what CORS answers they get (`origin`),
//! who the peer is behind trusted proxies (`peer`), which topics may be read
//! (`topics`), how much one peer may take (`limits`), what the admin listener
//! accepts (`admin`), and how a request is named in the access log (`route`).
//!
//! Desktops connect without credentials, so this is the only guard in front of an
//! OAuth client that can read every user's conversations. The listeners call these
//! (`downstream::gate`, `downstream::peers`, `admin`); each decision has unit tests
//! that refuse what it must and admit what it must.

pub mod admin;
pub mod limits;
pub mod origin;
pub mod peer;
pub mod route;
pub mod topics;
