
r1def parse(args):"333?fff?( *	 

