"""The cluster secret, signed bearer tokens and the operator authorizer.

A low-level package with no Ray, HTTP framework or media code in it, so that both the Serve
application (`deployments/`) and the bridge (`sfu_bridge/`) authenticate the same way:

- `auth.secret`    where the cluster secret comes from; a random one for commands that start
                   things when none is configured; never a built-in constant
- `auth.tokens`    `al1.` bearer tokens (WHIP/WHEP, operator) signed under that secret
- `auth.operator`  the one check every operator endpoint goes through
"""
