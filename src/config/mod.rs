//! Raw Kubernetes objects -> validated `model` types. (placeholder: being written)
