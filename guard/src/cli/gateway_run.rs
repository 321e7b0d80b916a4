//! `kt gateway run`.
