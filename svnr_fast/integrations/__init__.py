"""Bridges to other libraries, each imported only when asked for: `svnr_fast.integrations.diffusers`
(needs `pip install -e ".[diffusers]"`). Importing svnr_fast imports none of them."""
