//! Route handlers, one module per resource, named by verb.

pub mod health;
pub mod settings;
pub mod system;
