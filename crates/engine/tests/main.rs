//! The engine's integration tests, one binary (link time matters on 2 cores); one module per area.

mod hires;
mod inpaint;
mod layers;
mod lcm;
mod models;
mod noise;
mod pipeline;
mod prompting;
mod samplers;
mod sampling;
mod sdxl;
mod single_file;
mod support;
mod text;
