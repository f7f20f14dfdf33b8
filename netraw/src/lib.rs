//! Raw link-layer sockets for the speaker (work in progress).
