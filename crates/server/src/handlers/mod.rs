//! Route handlers, one module per resource, named by verb.

pub mod a1111;
pub mod characters;
pub mod health;
pub mod images;
pub mod jobs;
pub mod models;
pub mod openai;
pub mod presets;
pub mod settings;
pub mod system;
