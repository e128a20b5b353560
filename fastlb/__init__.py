"""fastlb: an L4 (TCP and UDP) load balancer with a Cython epoll data plane."""

__version__ = "0.1.0"
