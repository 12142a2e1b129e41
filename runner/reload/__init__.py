"""Hot reload: which folders are watched (`watcher`), which processes a changed file concerns
(`plan`), and the channel over which a supervised process of ours says what it imported, that it
has loaded, and that it serves (`channel`, `child`). The supervisor (runner.supervisor.reloads)
puts them together: start the replacement, let it load, hand over, stop the old one.
"""
