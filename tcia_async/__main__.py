from tcia_async.cli import main

raise SystemExit(main())
