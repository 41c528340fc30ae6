"""The HTTP protocol: the v1 REST routes (`classify`, `health`, `experiment`, `feedback`), the Open
Inference Protocol's REST binding (`v2`), the pages, and what every HTTP request passes through: the
header deadline (`protocol`), the observer (`observe`), the key middleware, body reading (`reading`), one
error shape (`errors`). May import `v2`, `serving` and everything below; never `grpc` or `app`."""
