//! What every Switchyard program shares and none of them owns: the Pipeline's NATS objects made as its
//! layout says (`admin`), a private `nats-server` (`embedded`), a JetStream connection and a consumer's
//! lag (`nats`), logging and the async runtime (`logging`), where the image keeps its programs (`image`), the `/metrics`, `/healthz` and `/readyz`
//! endpoints (`probes`), the units' latest reports as they publish them (`reports`), and child
//! processes that die with their parent (`os`).

pub mod admin;
pub mod books;
pub mod credentials;
pub mod embedded;
pub mod embedded_postgres;
pub mod frame;
pub mod image;
pub mod logging;
pub mod nats;
pub mod os;
pub mod probes;
pub mod reports;
