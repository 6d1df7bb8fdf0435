//! Where `.proto` imports come from: inline sources, the import paths, protobuf's
//! well-known types, and — last, so a user's own copy wins — the two `google/api` files
//! that declare the `google.api.http` annotation.

use std::collections::BTreeMap;

use protox::Error;
use protox::file::{File, FileResolver};

/// The `google.api.HttpRule` message and its pattern, as the annotation's wire format defines
/// them (field numbers are what matter; comments and options are left out).
const HTTP_PROTO: &str = r#"
syntax = "proto3";
package google.api;

message Http {
  repeated HttpRule rules = 1;
  bool fully_decode_reserved_expansion = 2;
}

message HttpRule {
  string selector = 1;
  oneof pattern {
    string get = 2;
    string put = 3;
    string post = 4;
    string delete = 5;
    string patch = 6;
    CustomHttpPattern custom = 8;
  }
  string body = 7;
  string response_body = 12;
  repeated HttpRule additional_bindings = 11;
}

message CustomHttpPattern {
  string kind = 1;
  string path = 2;
}
"#;

/// The `google.api.http` extension of method options.
const ANNOTATIONS_PROTO: &str = r#"
syntax = "proto3";
package google.api;

import "google/api/http.proto";
import "google/protobuf/descriptor.proto";

extend google.protobuf.MethodOptions {
  HttpRule http = 72295728;
}
"#;

/// Sources given in the configuration, by file name.
pub(super) struct Inline(pub BTreeMap<String, String>);

impl FileResolver for Inline {
    fn open_file(&self, name: &str) -> Result<File, Error> {
        match self.0.get(name) {
            Some(src) => File::from_source(name, src),
            None => Err(Error::file_not_found(name)),
        }
    }
}

/// The `google/api` annotation files.
pub(super) struct GoogleApi;

impl FileResolver for GoogleApi {
    fn open_file(&self, name: &str) -> Result<File, Error> {
        match name {
            "google/api/http.proto" => File::from_source(name, HTTP_PROTO),
            "google/api/annotations.proto" => File::from_source(name, ANNOTATIONS_PROTO),
            _ => Err(Error::file_not_found(name)),
        }
    }
}
