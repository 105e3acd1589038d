//! Integration tests, one binary (one link) for all of them.

mod adversarial;
mod api;
mod callbacks;
mod cli;
mod crash_safety;
mod data_files;
mod distributed;
mod examples;
mod gradients;
mod keras_export;
mod keras_files;
mod keras_reference;
mod layers;
mod loaders_fuzz;
mod loss_weighting;
mod masks;
mod metrics;
mod mpi;
mod mutations;
mod normalization;
mod probability_rule;
mod run_data;
mod run_files;
mod strict_config;
mod support;
mod training;
