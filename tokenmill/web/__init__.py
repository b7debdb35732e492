"""The web front: the catalog, model pages, playground and usage dashboard, served by the API's own
server and origin (`mount_web`), from templates and static assets in this package only."""

from tokenmill.web.pages import mount_web

__all__ = ["mount_web"]
