//! Integration tests of ld-server: one target, modules per area (link time on 2 cores).

mod api;
mod chat;
mod cli;
mod models;
mod service;
