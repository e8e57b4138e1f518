"""The supernode: task registry, CDN, scheduler and the peers' control service."""
