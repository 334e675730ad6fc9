//! Integration tests of ld-server: one target, modules per area (link time on 2 cores).

mod api;
mod chat;
mod cli;
mod diagnostics;
mod images;
mod models;
mod service;
mod support;
